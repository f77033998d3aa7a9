"""A profile's pipeline stage by stage, each stage timed: what one GPU needs for a profile.

`make demo-smollm2` runs a profile through DVC (on a GPU three methods at once:
privtune/lanes.py, the same lanes as here). This runs the same stage commands (`privtune
prepare`, `base`, then `finetune`, `evaluate` and `attack` of each method) without DVC, for a
machine that has the stages' libraries but not DVC (the device tool's GPU machines,
scripts/device_check.sh): `prepare` and `base` first, then each method's three stages in
order, methods spread over `--lanes` lanes. With one lane the total is the sequential run's
wall time; with more, each stage's time is measured while others share the GPU, so their sum
likely overstates the sequential run's (an estimate, not a measurement). A stage not started
by `--deadline` seconds is skipped (the JSON says which), one still running at
`--hard-deadline` is stopped. Writes <out>/stage_times.json and <out>/summary.md.

    python benchmarks/profile_stages.py smollm2 --out /tmp/smollm2 [--lanes 3]
        [--set finetune.epochs=1.0] [--deadline 600] [--methods nonprivate dpsgd]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's privtune, as the stages it starts run

from privtune.lanes import METHOD_STAGES  # noqa: E402
from privtune.profiles import run_params  # noqa: E402

SUMMARY_TIMEOUT = 300  # seconds


def stage_env() -> dict[str, str]:
    """The stages import this checkout's privtune (src/) before any installed one."""
    paths = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


class Clock:
    """Seconds since the run began, the deadlines, and every stage's record."""

    def __init__(self, deadline: float, hard_deadline: float) -> None:
        self.start = time.monotonic()
        self.deadline, self.hard_deadline = deadline, hard_deadline
        self.records: list[dict] = []
        self.lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.start

    def add(self, record: dict) -> None:
        with self.lock:
            self.records.append(record)
        status = record["status"]
        took = f"{record['seconds']:.1f} s" if "seconds" in record else ""
        print(f"[{self.now():7.1f} s] {record['stage']:>22}: {status} {took}", flush=True)


def run_stage(out: Path, clock: Clock, stage: str, method: str | None = None) -> bool:
    """One `privtune` command in the profile's project; True when it succeeded."""
    label = f"{stage} {method}" if method else stage
    if clock.now() > clock.deadline:
        clock.add({"stage": label, "status": "skipped (deadline)"})
        return False
    command = [sys.executable, "-m", "privtune.cli", "--no-progress", stage]
    log = out / "logs" / f"{label.replace(' ', '-')}.log"
    began = clock.now()
    left = clock.hard_deadline - began
    with log.open("w") as handle:
        process = subprocess.Popen(
            command + ([method] if method else []),
            cwd=out,
            env=stage_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped whole at the hard deadline
        )
        try:
            code = process.wait(timeout=None if math.isinf(left) else max(0.1, left))
            status = "ok" if code == 0 else f"failed (exit {code}, {log.name})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code, status = None, "stopped (hard deadline)"
    clock.add(
        {
            "stage": label,
            "status": status,
            "exit_code": code,
            "started_s": round(began, 2),
            "seconds": round(clock.now() - began, 2),
        }
    )
    return code == 0


def method_chain(out: Path, clock: Clock, method: str) -> None:
    """finetune, evaluate, attack of one method: each needs the one before."""
    for stage in METHOD_STAGES:
        if not run_stage(out, clock, stage, method):
            return


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"cpu ({os.cpu_count()} cores, torch {torch.__version__})"


def write_summary(out: Path) -> None:
    """`privtune summary --markdown` of the project into summary.md (its errors: logs/)."""
    try:
        summary = subprocess.run(
            [sys.executable, "-m", "privtune.cli", "summary", "--markdown"],
            cwd=out,
            capture_output=True,
            text=True,
            env=stage_env(),
            timeout=SUMMARY_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        print(f"privtune summary did not end in {SUMMARY_TIMEOUT} s", file=sys.stderr)
        return
    (out / "logs" / "summary.log").write_text(summary.stderr)
    if summary.returncode == 0:
        (out / "summary.md").write_text(summary.stdout)
        print(summary.stdout)
    else:
        print(f"privtune summary failed (logs/summary.log): {summary.stderr[-500:]}")


def run_lanes(out: Path, clock: Clock, methods: list[str], lanes: int) -> None:
    """prepare and base, then every method's chain in ``lanes`` lanes; the method stages that
    cannot run (prepare, base or the MLflow store failed) are recorded as not run."""
    ready = all(run_stage(out, clock, stage) for stage in ("prepare", "base"))
    if ready:
        from privtune.tracking import ensure_experiment

        try:
            ensure_experiment(out)  # created once here, not raced for by the lanes (flows do so)
        except Exception as err:  # any failure: recorded, the JSON still written
            clock.add({"stage": "mlflow store", "status": f"failed ({type(err).__name__})"})
            ready = False
    if not ready:
        for method in methods:
            for stage in METHOD_STAGES:
                clock.add({"stage": f"{stage} {method}", "status": "not run (setup failed)"})
        return
    with ThreadPoolExecutor(max_workers=lanes) as pool:
        list(pool.map(lambda method: method_chain(out, clock, method), methods))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="a profile of profiles.yaml")
    parser.add_argument("--out", type=Path, required=True, help="the project to build (new)")
    parser.add_argument("--lanes", type=int, default=1, help="methods run at once")
    parser.add_argument("--methods", nargs="+", help="these methods only, in this order")
    parser.add_argument("--set", nargs="*", default=[], help="dotted overrides: key=YAML value")
    parser.add_argument("--deadline", type=float, default=math.inf, help="seconds")
    parser.add_argument("--hard-deadline", type=float, default=math.inf, help="seconds")
    args = parser.parse_args()
    if args.lanes < 1:
        parser.error("--lanes must be at least 1")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    name, params = run_params(ROOT, args.profile, overrides)
    methods = list(dict.fromkeys(args.methods or params["methods"]))
    unknown = [m for m in methods if m not in params["methods"]]
    if unknown:
        parser.error(f"--methods: {unknown} are not methods of {name}: {list(params['methods'])}")
    if args.out.exists():
        parser.error(f"--out: {args.out} exists; name a new directory (or remove it)")
    params["methods"] = {m: params["methods"][m] for m in methods}
    (args.out / "logs").mkdir(parents=True)
    (args.out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    clock = Clock(args.deadline, args.hard_deadline)
    run_lanes(args.out, clock, methods, args.lanes)
    done = [r for r in clock.records if r["status"] == "ok"]
    result = {
        "profile": name,
        "overrides": overrides,
        "methods": methods,
        "lanes": args.lanes,
        "deadline_s": args.deadline,
        "hard_deadline_s": args.hard_deadline,
        "device": device_name(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "wall_seconds": round(clock.now(), 2),
        "stage_seconds_sum": round(sum(r["seconds"] for r in done), 2),
        "complete": len(done) == 2 + len(METHOD_STAGES) * len(methods),
        "stages": clock.records,
    }
    (args.out / "stage_times.json").write_text(json.dumps(result, indent=2) + "\n")
    write_summary(args.out)
    print(
        f"{name}: {len(done)} stages ok in {result['wall_seconds']:.0f} s wall "
        f"({args.lanes} lane(s)); the stages' own times sum to {result['stage_seconds_sum']:.0f} s"
    )
    failed = [r["stage"] for r in clock.records if r["status"].startswith(("failed", "stopped"))]
    if failed:
        sys.exit(f"failed or stopped: {', '.join(failed)}")


if __name__ == "__main__":
    main()
