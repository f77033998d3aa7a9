"""Wall time of a sweep (flows/sweep.py) run one point after another (`runner.kind: local`, each
point a `dvc exp run --temp`) against the same sweep fanned out on a local Ray cluster
(`runner.kind: ray`, every point at once, one clone each), on this machine.

Both sides run in copies of one freshly built project whose prepare and base stages are
already in the DVC cache, so each side times the points only (plus, for Ray, starting the
local cluster). The default sweep (9 methods x 3 epsilons x 3 seeds at full size) takes hours
on a 2-core CPU; `--size`, `--methods`, `--epsilons` and `--seeds` define the reduced sweep
this measures, and the JSON records exactly what ran.

    python benchmarks/sweep_fanout.py                    # writes results/sweep_fanout.json
    python benchmarks/sweep_fanout.py --one-thread-sequential   # and in turn, one thread a run

Each side's complete record is saved to `<out>.partial.json` as soon as it ends, and an in-turn
side's record point by point; `--resume` measures only what is missing there (a run cut short,
e.g. the whole default sweep, which needs about three hours on 2 cores, split over sittings).
Every side and every sitting first times a fixed one-thread workload (`calibration_seconds`),
so sides measured at different times can be told apart from a machine that ran slower.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"

# The sizes of the project: "tiny" is the test suite's pipeline (tests/conftest.py TINY_PARAMS),
# "quick" the quick profile's (profiles.yaml), "full" the default pipeline's (no overrides).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "prepare": {
            "n_private": 120,
            "n_public": 200,
            "canaries": {"repetitions": [1, 4], "per_repetition": 1, "held_out": 2, "audit": 16},
        },
        "base": {"vocab_size": 400, "n_layer": 1, "n_head": 2, "n_embd": 32, "max_length": 64,
                 "steps": 20, "batch_size": 16},
        "finetune": {"delta": 1e-5, "batch_size": 16, "epochs": 1.0, "log_every": 2,
                     "eval_every": 4, "eval_records": 8, "audit_canaries": 64, "lora": {"r": 4}},
        "evaluate": {"max_records": 8},
        "attack": {"members": 10, "bootstrap": 100, "candidates": 100, "samples": 1},
    },
    "quick": {
        "prepare": {"n_private": 480, "n_public": 600},
        "base": {"vocab_size": 1024, "n_head": 2, "n_embd": 64, "max_length": 96, "steps": 150,
                 "batch_size": 16, "device": "cpu"},
        "finetune": {"device": "cpu", "batch_size": 16, "epochs": 1.0, "eval_records": 16,
                     "lora": {"r": 4}},
        "attack": {"candidates": 1000, "bootstrap": 200},
    },
    "full": {},  # the shipped params.yaml as it is: the default sweep's points at their size
}  # fmt: skip


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "methods":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _sh(cwd: Path, *cmd: str) -> str:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def build_project(where: Path, size: str, methods: list[str]) -> Path:
    """A git + DVC project with this checkout's dvc.yaml and code, the reduced params, and
    prepare and base built (so both sides find them in the DVC cache)."""
    project = where / "project"
    project.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", project)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (project / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = _merge(shipped, SIZES[size])
    params["methods"] = {m: shipped["methods"][m] for m in methods}
    # The sides are compared run for run (the same epsilon spent), so the noise is seeded from
    # finetune.seed; secret seeds cost the same time.
    params["finetune"]["secret_noise"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (
        ("git", "init", "-q"),
        ("git", "config", "user.email", "bench@example.com"),
        ("git", "config", "user.name", "bench"),
        ("dvc", "init", "-q"),
        ("dvc", "config", "core.check_update", "false"),
        ("git", "add", "-A"),
        ("git", "commit", "-qm", "sweep benchmark"),
        ("dvc", "repro", "base"),
    ):
        _sh(project, *cmd)
    return project


def set_runner(project: Path, runner: dict[str, Any]) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["runner"] = {**params.get("runner", {}), **runner}
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def experiments(project: Path) -> dict[str, dict[str, Any]]:
    """Each experiment's metrics, by name (`dvc exp show --json`)."""
    shown = json.loads(_sh(project, "dvc", "exp", "show", "--json"))
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            found[exp["name"]] = {
                path: entry.get("data", {})
                for path, entry in (rev["data"].get("metrics") or {}).items()
            }
    return found


def _epsilons(found: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each experiment's spent epsilon per fine-tuning (metrics/finetune-<method>.json)."""
    return {
        name: {
            path: data.get("epsilon")
            for path, data in sorted(metrics.items())
            if Path(path).name.startswith("finetune-")
        }
        for name, metrics in sorted(found.items())
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--methods", nargs="+", default=["dpsgd"], help="or: all (every method)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--concurrency", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--one-thread-sequential",
        action="store_true",
        help="also time the points in turn with one torch thread each (as fanned out)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "sweep_fanout.json")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the sides <out>.partial.json already holds for this sweep; measure the rest",
    )
    args = parser.parse_args()
    if args.methods == ["all"]:  # resolved once: the project and the JSON name the same list
        args.methods = list(yaml.safe_load((ROOT / "params.yaml").read_text())["methods"])

    from privtune.tracking import disable_telemetry

    disable_telemetry()
    work = Path(tempfile.mkdtemp(prefix="privtune-sweep-bench-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from prefect.testing.utilities import prefect_test_harness

    from flows.sweep import sweep

    # One Prefect server for both sides (started once, outside the timings).
    with prefect_test_harness(server_startup_timeout=300):
        run(args, work, sweep)


def start_local_ray(runner: dict[str, Any], attempts: int = 3) -> None:
    """The local Ray the fanned-out side runs on, started before the flow (its RayTaskRunner
    then uses it), with the flow's own settings (tasks/runners.py), retried: on a heavily
    loaded machine the raylet may miss Ray's fixed 30 s registration window."""
    import ray
    from prefect.settings import get_current_settings

    from privtune.config import RunnerParams
    from tasks import runners

    made = runners.task_runner(RunnerParams(**runner), get_current_settings().api.url)
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**made.init_kwargs)
            return
        except Exception as err:  # noqa: BLE001 (Ray raises a bare Exception on a timeout)
            print(f"local Ray did not start (attempt {attempt}): {err}", flush=True)
            ray.shutdown()
    raise SystemExit("the local Ray cluster did not start")


@contextlib.contextmanager
def sampled_load(every: float = 10.0) -> Iterator[list[float]]:
    """The 1-minute load average, sampled every `every` seconds until the block ends."""
    samples = [os.getloadavg()[0]]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            samples.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        done.set()
        sampler.join()
        samples.append(os.getloadavg()[0])


def point_spans() -> dict[str, tuple[str, float]]:
    """Every sweep point's task run so far on the Prefect server: id -> (name, seconds)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        found = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="experiment-"))
        )
    return {
        str(run.id): (run.name, (run.end_time - run.start_time).total_seconds())
        for run in found
        if run.start_time and run.end_time
    }


def finetune_runs(project: Path) -> list[list[str]]:
    """(finetune.epsilon, finetune.seed, status) of each fine-tuning run in the project's
    MLflow store: every point's run must be there, finished."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name("privtune")
    if experiment is None:  # no point has run yet
        return []
    return sorted(
        [run.data.params["finetune.epsilon"], run.data.params["finetune.seed"], run.info.status]
        for run in client.search_runs([experiment.experiment_id])
        if run.data.tags.get("stage") == "finetune"
    )


def _code_version() -> dict[str, str]:
    """The commit of the code that ran (and whether it had local changes), and the engines."""
    from importlib.metadata import version

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    found = {"commit": git("rev-parse", "HEAD"), "dirty": str(bool(git("status", "--porcelain")))}
    return found | {
        name: version(name) for name in ("dvc", "prefect", "prefect-ray", "ray", "torch")
    }


def calibrate() -> float:
    """Seconds one thread takes for a fixed float workload (1024 products of 512 x 512
    matrices): the machine's speed when a side starts, for sides measured at other times."""
    import torch

    from tasks.runners import thread_limit

    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    with thread_limit(1):
        start = time.perf_counter()
        for _ in range(1024):
            a = torch.tanh(a @ a)
        return time.perf_counter() - start


def _what(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep a partial file's sides belong to (a resumed run must measure the same)."""
    return {
        "size": args.size,
        "methods": args.methods,
        "epsilons": args.epsilons,
        "seeds": args.seeds,
        "concurrency": args.concurrency,
    }


def side_copy(project: Path, work: Path, side: str, runner: dict[str, Any]) -> Path:
    """A copy of the built project for one side, its `runner` section committed."""
    copy = work / side
    shutil.copytree(project, copy, symlinks=True)
    set_runner(copy, runner)
    _sh(copy, "git", "commit", "-qam", f"runner: {side}", "--allow-empty")
    return copy


def _load_summary(samples: list[float]) -> dict[str, Any]:
    return {
        "mean": round(sum(samples) / len(samples), 2),
        "max": round(max(samples), 2),
        "samples": len(samples),
    }


def measure_side(
    side: str, runner: dict[str, Any], threads: int | None, project: Path, work: Path, args, sweep
) -> dict[str, Any]:
    """Run the sweep on one side in its own copy of the project: its complete record."""
    from tasks.runners import thread_limit

    copy = side_copy(project, work, side, runner)
    calibration = calibrate()
    load = os.getloadavg()[0]
    print(f"{side}: sweeping {args.epsilons} x {args.seeds}", flush=True)
    seen = set(point_spans())
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    start = time.perf_counter()
    with sampled_load() as samples, thread_limit(threads):
        if runner["kind"] == "ray":
            start_local_ray(runner)  # timed: part of what fanning out costs
        sweep(root=str(copy), epsilons=args.epsilons, seeds=args.seeds)
    seconds = time.perf_counter() - start
    record = {
        "runner": runner,
        "threads_per_run": threads or "torch default (all CPUs)",
        "seconds": round(seconds, 1),
        "started": started,
        "calibration_seconds": round(calibration, 2),
        # each point's task run, start to end (Prefect): alone, or two at once
        "point_seconds": {
            name: round(seconds_, 1)
            for key, (name, seconds_) in sorted(point_spans().items(), key=lambda x: x[1])
            if key not in seen
        },
        # (finetune.epsilon, finetune.seed, status) of each fine-tuning run
        "mlflow_finetune_runs": finetune_runs(copy),
        "load_average_1min_at_start": load,
        # every 10 s while the side ran (its own runs included: 1 to 2 of it is ours)
        "load_average_1min_during": _load_summary(samples),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    if runner["kind"] == "ray":
        import ray

        ray.shutdown()
    record["experiments"] = experiments(copy)
    print(f"{side}: {seconds:.1f} s", flush=True)
    return record


def _without(record: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in keys}


def measure_in_turn(
    side: str,
    runner: dict[str, Any],
    threads: int | None,
    project: Path,
    work: Path,
    args: argparse.Namespace,
    sweep: Any,
    progress: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, Any]:
    """The points one after another, each its own sweep flow run, timed and kept in `progress`
    (and `save`d) as it ends: a sitting cut short keeps the points it finished, and the next
    runs only the others. In turn, the side's time is the sum of its points' (each point's
    flow run included); every sitting records its calibration, so a slower machine shows."""
    from flows.sweep import sweep_points
    from tasks.runners import thread_limit

    copy = side_copy(project, work, side, runner)
    sittings = progress.setdefault("sittings", [])
    sittings.append(
        {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "calibration_seconds": round(calibrate(), 2),
            "load_average_1min_at_start": os.getloadavg()[0],
        }
    )
    points = progress.setdefault("points", {})
    total = len(args.epsilons) * len(args.seeds)
    for epsilon, seed in itertools.product(args.epsilons, args.seeds):  # the flow's order
        [(name, _)] = sweep_points([epsilon], [seed])
        if name in points:
            continue
        print(f"{side}: point {name} ({len(points) + 1} of {total})", flush=True)
        before = Counter(map(tuple, finetune_runs(copy)))
        with sampled_load() as samples, thread_limit(threads):
            start = time.perf_counter()
            sweep(root=str(copy), epsilons=[epsilon], seeds=[seed])
            seconds = time.perf_counter() - start
        runs = Counter(map(tuple, finetune_runs(copy))) - before
        points[name] = {
            "seconds": round(seconds, 1),
            "sitting": len(sittings) - 1,
            "load_average_1min_during": _load_summary(samples),
            "mlflow_finetune_runs": sorted(list(run) for run in runs.elements()),
            "experiment": experiments(copy)[name],
        }
        save()
        print(f"{side}: {name} {seconds:.1f} s", flush=True)
    seconds = sum(point["seconds"] for point in points.values())
    print(f"{side}: {seconds:.1f} s (the sum of its points)", flush=True)
    return {
        "runner": runner,
        "threads_per_run": threads or "torch default (all CPUs)",
        "seconds": round(seconds, 1),
        "seconds_are": "the sum of the points' sweep flow runs, one after another",
        "started": sittings[0]["started"],
        "calibration_seconds": sittings[0]["calibration_seconds"],
        # one per sitting the side was measured in, with its own calibration
        "sittings": sittings,
        "point_seconds": {f"experiment-{name}": point["seconds"] for name, point in points.items()},
        "points": {
            name: _without(point, "experiment", "mlflow_finetune_runs")
            for name, point in points.items()
        },
        "mlflow_finetune_runs": sorted(
            run for point in points.values() for run in point["mlflow_finetune_runs"]
        ),
        "experiments": {name: point["experiment"] for name, point in points.items()},
    }


def run(args: argparse.Namespace, work: Path, sweep: Any) -> None:
    """Build the project, then time the sweep on each side not measured yet."""
    code = _code_version()  # before this run writes anything into the checkout
    partial_path = args.out.with_suffix(".partial.json")
    partial = {"sweep": _what(args), "sides": {}}
    if args.resume and partial_path.is_file():
        found = json.loads(partial_path.read_text())
        if found.get("sweep") != _what(args):
            raise SystemExit(f"{partial_path} holds another sweep: {found.get('sweep')}")
        partial = found
    try:
        sides = {  # Ray first: a machine warming up (caches, other load) favours the second
            "ray": {"kind": "ray", "num_cpus": 1, "max_concurrency": args.concurrency},
            "sequential": {"kind": "local"},
        }
        threads = {"ray": 1, "sequential": None}  # None: torch's default (all CPUs)
        if args.one_thread_sequential:  # in turn as fanned out: one thread a run
            sides["sequential_one_thread"] = {"kind": "local"}
            threads["sequential_one_thread"] = 1
        todo = [side for side in sides if side not in partial["sides"]]
        if todo:
            print(f"building the {args.size} project in {work}", flush=True)
            project = build_project(work, args.size, args.methods)

        def save() -> None:
            partial_path.parent.mkdir(parents=True, exist_ok=True)
            partial_path.write_text(json.dumps(partial, indent=2) + "\n")

        for side in todo:
            if sides[side]["kind"] == "local":  # in turn: resumable point by point
                progress = partial.setdefault("in_progress", {}).setdefault(side, {})
                progress["code"] = code  # the code of the last sitting
                record = measure_in_turn(
                    side, sides[side], threads[side], project, work, args, sweep,
                    progress=progress, save=save,
                )  # fmt: skip
                del partial["in_progress"][side]
            else:
                record = measure_side(side, sides[side], threads[side], project, work, args, sweep)
            partial["sides"][side] = record | {"code": code}
            save()
        done = partial["sides"]
        shown = {side: done[side].pop("experiments") for side in done}
        spent = {side: _epsilons(found) for side, found in shown.items()}
        seconds = {side: done[side]["seconds"] for side in done}
        result = {
            "what": "wall time of flows/sweep.py, one point after another vs fanned out on Ray",
            "sweep": {
                "size": args.size,
                "params_overrides": SIZES[args.size],
                "methods": args.methods,
                "epsilons": args.epsilons,
                "seeds": args.seeds,
                "points": len(args.epsilons) * len(args.seeds),
                "stages_per_point": "finetune, evaluate, attack per method; register; report",
            },
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            # the code of the last side measured; each side keeps its own under "code"
            "code": code,
            **done,
            "speedup": round(seconds["sequential"] / seconds["ray"], 2),
            **(
                {
                    "speedup_vs_one_thread": round(
                        seconds["sequential_one_thread"] / seconds["ray"], 2
                    )
                }
                if "sequential_one_thread" in seconds
                else {}
            ),
            "experiments": sorted(shown["ray"]),
            # the privacy spent does not depend on threads; float metrics may (1 thread per
            # run fanned out, all CPUs per run in turn), so they are reported, not required
            "same_epsilons_both_ways": spent["sequential"] == spent["ray"],
            "same_metrics_both_ways": shown["sequential"] == shown["ray"],
            "epsilons": spent["ray"],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        partial_path.unlink(missing_ok=True)
        print(json.dumps({k: result[k] for k in ("sequential", "ray", "speedup")}, indent=2)[:2000])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
