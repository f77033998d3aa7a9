"""A profile's pipeline with several methods at once, for a GPU that one method leaves idle.

`dvc repro` runs one stage after another. On one GPU, SmolLM2's fine-tuning, evaluation and
attacks each use a fraction of it (README, "Time on one GPU": three methods at once took 260 s
where one after another is estimated at about 770 s). `run` keeps DVC's bookkeeping and runs
the same stages in lanes: `dvc repro prepare base`, then each method's finetune, evaluate and
attack in order, `lanes` methods at a time, then `dvc repro` for the rest (register, report).
DVC holds its repository lock only while it checks a stage and writes dvc.lock, not while the
stage's command runs (dvc/stage/run.py, `unlocked_repo`), and `--wait-for-lock` makes the
lanes take turns at it, so the outputs and dvc.lock are those `dvc repro` leaves; the Prefect
pipeline's Ray fan-out relies on the same.

A lane stage's output goes to logs/<stage>.log in the project (progress bars of several stages
would interleave); this process shows one bar of stages with its ETA, a line per stage ended
and writes logs/lanes.json (each stage's start, seconds and result). A stage that fails stops
its method's lane; the other lanes go on, and register and report are not run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

METHOD_STAGES = ("finetune", "evaluate", "attack")  # a method's stages in dvc.yaml, in order
LOGS_DIR = "logs"
TIMES_FILE = "lanes.json"
# Thread knobs of the numeric libraries a stage's command reads when it starts (torch reads
# OMP_NUM_THREADS): runs at once share the machine's CPUs instead of each taking all of them.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
CUDA_DEVICES = "CUDA_VISIBLE_DEVICES"
OUT_OF_MEMORY = "out of memory"  # torch's CUDA (and CPU allocator) message


def visible_gpus() -> list[str]:
    """The GPUs this process sees, as CUDA_VISIBLE_DEVICES would name them to a child (its
    own list when set, so a child never sees a GPU this process was not given)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get(CUDA_DEVICES, "").split(",") if d.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


def dvc_env(target: Path) -> tuple[str, dict[str, str]]:
    """DVC's executable and the environment its stages need: the project's own copy of the
    code importable, and this interpreter's scripts (dvc, the stages' `privtune` CLI) on PATH
    whether or not its environment is activated."""
    scripts = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target / "src"), *sys.path])}
    env["PATH"] = os.pathsep.join([str(scripts), env.get("PATH", "")])
    dvc = scripts / "dvc" if (scripts / "dvc").is_file() else "dvc"
    return str(dvc), env


def lane_env(env: dict[str, str], lanes: int) -> dict[str, str]:
    """``env`` for a stage that runs beside ``lanes - 1`` others: a share of the CPUs each
    (unless the caller set the thread counts) and no library progress bars in its log."""
    share = str(max(1, len(os.sched_getaffinity(0)) // max(1, lanes)))  # this process's CPUs
    threads = {name: share for name in THREAD_VARIABLES if name not in env}
    return {**env, **threads, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class Lanes:
    """The stages of one run: started, ended, and the bar and lines that show them."""

    def __init__(
        self, target: Path, lanes: int, methods: list[str], gpus: list[str] | None = None
    ) -> None:
        """``gpus``: the GPUs to share the lanes out over (default: those this process sees,
        when more than one; with one or none, every lane sees what this process sees)."""
        from privtune.progress import progress_bar

        self.target, self.lanes, self.methods = target, max(1, lanes), methods
        self.dvc, env = dvc_env(target)
        self.env = lane_env(env, self.lanes)
        self.logs = target / LOGS_DIR
        self.logs.mkdir(exist_ok=True)
        self.before = _ran_before(self.logs / TIMES_FILE)
        self.records: list[dict] = []
        self.running: list[str] = []  # the stages running now, shown beside the bar
        gpus = visible_gpus() if gpus is None else gpus
        self.gpu_load = dict.fromkeys(gpus, 0) if len(gpus) > 1 else {}  # lanes on each GPU
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # set by Ctrl-C (or a lane's crash): nothing starts
        self.start = time.monotonic()
        # its console is stdout's: the stage lines are the command's output
        self.progress = progress_bar(sys.stdout.isatty(), stderr=False)
        self.bar = self.progress.add_task(
            f"{len(methods)} methods, {self.lanes} at once",
            total=len(methods) * len(METHOD_STAGES),
            status="",
        )

    def stage(self, name: str, gpu: str | None = None) -> bool:
        """`dvc repro --single-item <name>`, its output in logs/<name>.log; True when it ran
        or was up to date (DVC's own message says which; the log of the run that did the work
        is then kept). ``gpu``: the one GPU its command sees (CUDA_VISIBLE_DEVICES)."""
        from privtune.cli import ERROR_FILE_ENV, EXIT_BAD_INPUT, EXIT_INTERRUPTED, read_error_file
        from privtune.errors import PrivtuneError
        from privtune.progress import quiet_notices
        from privtune.stages import preflight

        log = self.logs / f"{name}.log"
        try:  # what the stage would refuse, before DVC removes its outputs to run it
            with quiet_notices():  # its warnings: in the stage's own log, when it runs
                preflight.check(self.target, name)
        except PrivtuneError as err:
            log.write_text(f"error: {err}\n")  # the CLI's own line: fields, never records
            record = {"stage": name, "status": "failed", "exit_code": EXIT_BAD_INPUT}
            self.ended(record | {"message": str(err), "log": str(log.relative_to(self.target))})
            return False
        began = time.monotonic() - self.start
        self.show(started=name)
        with tempfile.TemporaryDirectory(prefix="privtune-lane-") as tmp:
            report, output = Path(tmp) / "error.json", Path(tmp) / "output.log"
            with output.open("w") as out:
                code = subprocess.run(
                    [self.dvc, "--wait-for-lock", "repro", "--single-item", name],
                    cwd=self.target,
                    env={
                        **self.env,
                        ERROR_FILE_ENV: str(report),
                        **({CUDA_DEVICES: gpu} if gpu is not None else {}),
                    },
                    stdout=out,
                    stderr=subprocess.STDOUT,
                ).returncode
            found = read_error_file(report)  # the CLI's message for exits 2-4
            message = None if found is None else found["message"]
            text = output.read_text(errors="replace")  # searched, never shown: it is the log
            skipped = not code and f"Stage '{name}' didn't change, skipping" in text
            if not (skipped and log.is_file()):
                shutil.move(output, log)
        seconds = time.monotonic() - self.start - began
        found = re.findall(r"exited with (-?\d+)", text)  # the stage's own code (DVC's is 255)
        stage_code = int(found[-1]) if found else None
        if code and (stage_code == EXIT_INTERRUPTED or self.stopping.is_set()):
            status = "interrupted"
        else:
            status = "failed" if code else "up to date" if skipped else "ok"
        if status == "failed" and message is None and OUT_OF_MEMORY in text:
            message = (
                f"out of memory with {self.lanes} lanes: run fewer (--lanes; "
                "make demo-smollm2 SMOLLM2_LANES=...)"
            )
        record = {
            "stage": name,
            "status": status,
            "exit_code": stage_code if code and stage_code is not None else code,
            "started_s": round(began, 1),
            "seconds": round(seconds, 1),
            "log": str(log.relative_to(self.target)),
        }
        if message:
            record["message"] = message
        if gpu is not None:
            record["gpu"] = gpu
        if skipped and name in self.before:
            record["ran"] = self.before[name]  # when and how long the run that did it took
        self.ended(record)
        return code == 0

    def show(self, started: str | None = None, ended: str | None = None) -> None:
        with self.lock:
            if started:
                self.running.append(started)
            if ended in self.running:
                self.running.remove(ended)
            self.progress.update(self.bar, status=", ".join(self.running))

    def ended(self, record: dict) -> None:
        self.show(ended=record["stage"])
        with self.lock:
            self.records.append(record)
            self.progress.advance(self.bar)
        took = f" in {record['seconds']:.0f} s" if "seconds" in record else ""
        line = f"{record['stage']}: {record['status']}{took}"
        if record["status"] == "failed":
            line += f" ({record.get('message') or 'exit ' + str(record['exit_code'])}; "
            line += f"{record['log']})"
        # whole lines, as written: a message may hold brackets (not rich markup) or be long
        self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def lane(self, method: str) -> None:
        """finetune, evaluate, attack of one method, on the GPU with the fewest lanes (when
        there are several): each stage needs the one before."""
        gpu = self._take_gpu()
        try:
            for index, stage in enumerate(METHOD_STAGES):
                if self.stopping.is_set():  # interrupted: this stage and the rest
                    left = METHOD_STAGES[index:]
                elif not self.stage(f"{stage}@{method}", gpu):  # failed: the stages after it
                    left = METHOD_STAGES[index + 1 :]
                else:
                    continue
                for later in left:
                    self.ended({"stage": f"{later}@{method}", "status": "not run"})
                return
        finally:
            if gpu is not None:
                with self.lock:
                    self.gpu_load[gpu] -= 1

    def _take_gpu(self) -> str | None:
        with self.lock:
            if not self.gpu_load:
                return None
            gpu = min(self.gpu_load, key=self.gpu_load.__getitem__)  # the first of the least
            self.gpu_load[gpu] += 1
            return gpu

    def run(self) -> list[dict]:
        """Every method's lane, ``lanes`` at once; the stages' records, in the order they
        ended (also written to logs/lanes.json). On Ctrl-C the stages running end (a terminal
        interrupts them too) and no other starts; KeyboardInterrupt is raised after."""
        pool = ThreadPoolExecutor(max_workers=self.lanes)
        futures: list[Future] = []
        try:
            with self.progress:
                for method in self.methods:
                    futures.append(pool.submit(self.lane, method))
                for future in futures:
                    future.result()
        except BaseException:  # Ctrl-C, or a lane's own crash: the others start nothing more
            self.stopping.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            # the lanes that started end their stage (shutdown may not join a thread that a
            # Ctrl-C caught starting); a cancelled future never counts as done for wait()
            wait([future for future in futures if not future.cancelled()])
            seen = {record["stage"] for record in self.records}
            for method in self.methods:  # lanes cancelled before they started
                for stage in METHOD_STAGES:
                    if f"{stage}@{method}" not in seen:
                        self.records.append({"stage": f"{stage}@{method}", "status": "not run"})
            summary = {
                "lanes": self.lanes,
                "methods": self.methods,
                "interrupted": self.stopping.is_set(),
                "wall_seconds": round(time.monotonic() - self.start, 1),
                "stages": self.records,
            }
            (self.logs / TIMES_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return self.records


def _ran_before(times: Path) -> dict[str, dict]:
    """From the last run's lanes.json, each stage's record of the run that did the work."""
    try:
        stages = json.loads(times.read_text())["stages"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    ran = {}
    for record in stages if isinstance(stages, list) else []:
        if isinstance(record, dict) and record.get("status") == "ok":
            ran[record["stage"]] = {k: record.get(k) for k in ("started_s", "seconds")}
        elif isinstance(record, dict) and isinstance(record.get("ran"), dict):
            ran[record["stage"]] = record["ran"]
    return ran


def run(target: Path, lanes: int) -> int:
    """The profile project's pipeline with ``lanes`` methods at once; DVC's exit code, or 1
    when a method's stage failed (register and report then wait for a rerun)."""
    from privtune.config import load_params
    from privtune.profiles import repro
    from privtune.tracking import ensure_experiment

    code = repro(target, "prepare", "base")
    if code:
        return code
    methods = list(load_params(target / "params.yaml").methods)
    if methods:
        ensure_experiment(target)  # created once here, not raced for by the lanes
        records = Lanes(target, min(lanes, len(methods)), methods).run()
        failed = [r["stage"] for r in records if r["status"] in ("failed", "interrupted")]
        if failed:
            print(
                f"failed: {', '.join(failed)} (their logs in {target / LOGS_DIR}); register "
                "and report not run: fix what the message says, then rerun the same command "
                "(stages done are not redone)",
                file=sys.stderr,
            )
            return 1
    return repro(target)
