"""The DP step from 1 to 2 processes on the CPU: one run across `torchrun` ranks (gloo) against
one process, on the same logical batches.

Each side times ``Trainer.step`` of privtune.train (the step the pipeline runs, audit gradient
canaries included) on the same Poisson batches (seeded samplers; the 2-rank run draws the same
mask on every rank and each rank takes half the records, privacy/distributed.py):

- one process with 2 threads: what `privtune finetune` does on a 2-core machine;
- one process with 1 thread: one rank's share of the machine, for the scaling efficiency;
- `torchrun --nproc_per_node 2`, gloo, 1 thread each: the same two cores as two ranks.

The sides alternate round by round (rotating which goes first), so a shared, noisy machine's
load hits them alike; a step is timed from a barrier of every rank to its end (the clipped
sums' all-reduce and the norms' gather end it on every rank together). Each side also reports
the seconds its steps spent in collectives (rank 0's view: transfer plus waiting for the
slower rank) and its per-step losses: the 2-rank run's must be the one process's (the same
batches and updates; float sums in another order), or the benchmark stops. Writes
benchmarks/results/ddp_scaling.json.

    make bench-ddp      # or: python benchmarks/ddp_scaling.py [--configs default smollm2-random]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
SIDES = {  # name -> (processes, threads per process)
    "one_process_two_threads": (1, 2),
    "one_process_one_thread": (1, 1),
    "two_processes_one_thread_each": (2, 1),
}
BATCH = {"default": 32, "gpt2-small": 8, "smollm2-random": 16, "smollm2": 16}
STEPS = {"default": 30, "gpt2-small": 5, "smollm2-random": 4, "smollm2": 4}
WARMUP = 2


class CollectiveClock:
    """Seconds spent in torch.distributed's collectives while installed (privacy/distributed.py
    calls them through the module, so wrapping the module's functions sees every call)."""

    NAMES = ("all_reduce", "all_gather_object", "broadcast_object_list")

    def __init__(self) -> None:
        import torch.distributed as dist

        self.seconds = 0.0
        self._dist = dist
        self._kept = {name: getattr(dist, name) for name in self.NAMES}
        for name, original in self._kept.items():
            setattr(dist, name, self._timed(original))

    def _timed(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed

    def remove(self) -> None:
        for name, original in self._kept.items():
            setattr(self._dist, name, original)


def worker(config: str, threads: int, steps: int, batch: int, out: Path) -> None:
    """One side's process (or rank): build the step, warm up, time ``steps`` steps."""
    import torch.distributed as dist

    from privtune.privacy.distributed import process_group_from_environment
    from step_overhead import Stepper, base_params

    torch.set_num_threads(threads)
    with process_group_from_environment() as replica:
        stepper = Stepper("dp", config, base_params(config), torch.device("cpu"), batch, steps + 3)
        trainer = stepper.trainer
        for _ in range(WARMUP):
            stepper.step()
        times, losses, records, collective = [], [], [], []
        clock = CollectiveClock()
        try:
            for _ in range(steps):
                step, indices = next(stepper.batches)
                if replica.distributed:
                    dist.barrier()  # every rank starts the step together (not clocked)
                before, start = clock.seconds, time.perf_counter()
                done = trainer.step(step, indices)
                times.append(time.perf_counter() - start)
                collective.append(clock.seconds - before)
                losses.append(done[0] if done else math.nan)
                records.append(len(indices))
        finally:
            clock.remove()
        if replica.is_main:
            out.write_text(
                json.dumps(
                    {
                        "step_s": times,
                        "collective_s": collective,
                        "losses": losses,
                        "records": records,
                        "world_size": replica.world_size,
                        "threads": torch.get_num_threads(),
                    }
                )
            )


def run_side(side: str, config: str, steps: int, batch: int, scratch: Path) -> dict[str, Any]:
    """One side, in fresh processes (torchrun for 2): its rank 0's timings."""
    processes, threads = SIDES[side]
    out = scratch / f"{config}-{side}.json"
    out.unlink(missing_ok=True)
    script = [str(Path(__file__).resolve()), "--worker", config, "--threads", str(threads)]
    script += ["--steps", str(steps), "--batch", str(batch), "--out", str(out)]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node", str(processes), *script]  # standalone: a free port
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    load = os.getloadavg()[0]
    subprocess.run(command, env=env, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.read_text()) | {"load_before": round(load, 2)}


def loss_difference(sides: dict[str, dict[str, Any]], config: str) -> float:
    """The largest relative difference of a step's loss between sides, which ran the same
    logical batches and updates (the benchmark stops if they did not)."""
    first, *others = sides.values()
    worst = 0.0
    for other in others:
        if other["records"] != first["records"]:
            raise SystemExit(f"{config}: the sides drew different logical batches")
        differences = [
            abs(a - b) / abs(a) for a, b in zip(first["losses"], other["losses"], strict=True)
        ]
        worst = max([worst, *differences], key=lambda d: math.inf if math.isnan(d) else d)
    if not worst <= 1e-4:  # NaN too
        raise SystemExit(f"{config}: the sides' losses differ (relative {worst:.2e})")
    return worst


def measure(config: str, rounds: int, steps: int, batch: int, scratch: Path) -> dict[str, Any]:
    names = list(SIDES)
    per_round: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    worst = 0.0
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        done = {}
        for side in order:
            print(f"{config}, round {r + 1}/{rounds}: {side}", flush=True)
            done[side] = run_side(side, config, steps, batch, scratch)
        worst = max(worst, loss_difference(done, config))
        for side in names:
            per_round[side].append(done[side])
    result: dict[str, Any] = {"config": config, "batch": batch, "steps_per_round": steps}
    result["rounds"] = rounds
    median = {}
    for side, runs in per_round.items():
        times = [t for run in runs for t in run["step_s"]]
        median[side] = statistics.median(times)
        result[side] = {
            "processes": SIDES[side][0],
            "threads_per_process": SIDES[side][1],
            "median_step_s": round(median[side], 4),
            "round_medians_s": [round(statistics.median(run["step_s"]), 4) for run in runs],
            "collective_share": round(
                sum(sum(run["collective_s"]) for run in runs) / sum(times), 3
            ),
            "load_before": [run["load_before"] for run in runs],
        }
    result["records_per_step"] = per_round[names[0]][0]["records"]
    two = median["two_processes_one_thread_each"]
    result["speedup_over_one_process"] = round(median["one_process_two_threads"] / two, 3)
    result["scaling_efficiency"] = round(median["one_process_one_thread"] / (2 * two), 3)
    result["largest_loss_difference"] = float(f"{worst:.2e}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["default", "smollm2-random"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="timed steps per side and round")
    parser.add_argument("--batch", type=int, help="expected logical batch (default per config)")
    parser.add_argument("--out", type=Path, default=RESULTS / "ddp_scaling.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.threads, args.steps, args.batch, args.out)
        return
    runs = []
    for config in args.configs:
        steps, batch = args.steps or STEPS[config], args.batch or BATCH[config]
        with tempfile.TemporaryDirectory(prefix="ddp-scaling-") as scratch:
            runs.append(measure(config, args.rounds, steps, batch, Path(scratch)))
        row = runs[-1]
        print(
            f"{config}: 1 process x 2 threads {row['one_process_two_threads']['median_step_s']} s,"
            f" 2 processes x 1 thread {row['two_processes_one_thread_each']['median_step_s']} s"
            f" a step: {row['speedup_over_one_process']}x; efficiency {row['scaling_efficiency']}",
            flush=True,
        )
    found = {
        "runs": runs,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "backend": "gloo",
    }
    args.out.write_text(json.dumps(found, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
