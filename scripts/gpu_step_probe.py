"""Where a DP step's extra time goes on a GPU: a one-minute probe for the next GPU session.

On an H200 the DP step took 134 ms (default model) to 389 ms (SmolLM2) longer than the
non-private one, while on the CPU, with tiny inputs, the difference is 1 ms (README, step
cost). This prints, on the default model: (1) A/B medians of the step with one thing changed
each (a fixed batch size, many warm-up steps, fp32, no audit canaries, opacus' per-sample
hooks instead of privtune's LoRA hooks, a short GIL switch interval), (2) each phase of
Trainer.step timed between synchronisations, (3) the step's synchronising calls by file:line,
(4) torch.profiler tables of three DP steps. Reading it: if a fixed batch size or long warm-up
removes the extra time, new Poisson batch shapes cost it; if fp32 does, bf16 kernels; if the
phases and the synchronising calls add up to it, CPU/GPU turn-taking.
scripts/device_check.sh runs it.

    python scripts/gpu_step_probe.py                       # a GPU: default model, 32 x 384
    python scripts/gpu_step_probe.py --device cpu --batch 4 --length 16 --steps 3  # smoke test
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import torch  # noqa: E402

import privtune.train as T  # noqa: E402
from privtune.config import load_params  # noqa: E402
from privtune.train import Trainer  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "step_overhead", ROOT / "benchmarks" / "step_overhead.py"
)
_so = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_so)
Stepper = _so.Stepper

ARGS = argparse.Namespace(device="cuda", batch=32, length=384, steps=10)
DEV = torch.device("cpu")
CUDA = False


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def build(kind: str, steps: int, **over) -> Trainer:
    """step_overhead.py's Stepper at the probe's size, with ``over`` finetune params changed."""
    base = load_params().base.model_copy(update={"max_length": ARGS.length})
    return Stepper(kind, "default", base, DEV, ARGS.batch, steps + 2, overrides=over).trainer


def run(kind: str, warm: int = 2, fixed: bool = False, label: str | None = None, **over) -> None:
    """The median step of one variant (``fixed``: every step on the first batch's records)."""
    steps = ARGS.steps
    trainer = build(kind, steps + warm, **over)
    batches, first, times, sizes = trainer.batches(), None, [], []
    for i in range(steps + warm):
        step, indices = next(batches)
        if fixed:
            first = first if first is not None else indices
            indices = first
        sync()
        began = time.perf_counter()
        trainer.step(step, indices)
        sync()
        if i >= warm:
            times.append(time.perf_counter() - began)
            sizes.append(len(indices))
    ms = statistics.median(times) * 1e3
    print(
        f"{label or kind:<34} median {ms:7.1f} ms  (min {min(times) * 1e3:6.1f}, max "
        f"{max(times) * 1e3:6.1f}; batch sizes {sizes})",
        flush=True,
    )


def cgroup_throttle() -> dict[str, str] | str:
    for path in ("/sys/fs/cgroup/cpu.stat", "/sys/fs/cgroup/cpu/cpu.stat"):
        try:
            with open(path) as handle:
                stat = dict(line.split() for line in handle)
            return {k: stat[k] for k in stat if "throttl" in k}
        except OSError:
            continue
    return "n/a"


def variants() -> None:
    """1. Which single change removes the extra time?"""
    before = cgroup_throttle()
    run("nonprivate", label="nonprivate (Poisson B)")
    run("dp", label="dp (Poisson B) = the benchmark")
    run("nonprivate", fixed=True, label="nonprivate, fixed B")
    run("dp", fixed=True, label="dp, fixed B")  # a cost per new batch shape?
    run("dp", warm=40, label="dp, 40 warm-up steps")  # the same: every B already seen
    run("dp", label="dp, precision fp32", precision="fp32")  # bf16 autocast kernels?
    run("dp", label="dp, no audit canaries", audit_canaries=0)
    run("dp", label="dp, opacus' per-sample hooks", grad_sampler="opacus")  # what ours save
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    run("dp", label="dp, GIL switch interval 10 us")  # the autograd thread waiting on the GIL?
    sys.setswitchinterval(old)
    print("cgroup throttling before/after:", before, cgroup_throttle())


def phases() -> None:
    """2. Each phase of the step between synchronisations; 3. the step's synchronising calls."""
    totals: dict[str, float] = collections.defaultdict(float)

    def timed(fn, label):
        def inner(*a, **k):
            sync()
            began = time.perf_counter()
            result = fn(*a, **k)
            sync()
            totals[label] += time.perf_counter() - began
            return result

        return inner

    for kind in ("nonprivate", "dp"):
        totals.clear()
        trainer = build(kind, 12)
        mechanism = trainer.engine.mechanism
        forward, backward = T.next_token_logits, torch.Tensor.backward
        T.next_token_logits = timed(forward, "forward")
        torch.Tensor.backward = timed(backward, "backward (+per-sample hooks)")
        if trainer.injector is not None:
            trainer.injector.rows = timed(trainer.injector.rows, "canary rows (CPU->GPU)")
        mechanism.accumulate = timed(mechanism.accumulate, "accumulate (norms+clip)")
        for name in ("take_sum", "add_noise", "scale"):
            if hasattr(mechanism, name):
                setattr(mechanism, name, timed(getattr(mechanism, name), name))
        hooks = trainer.engine._release_hooks
        hooks[:] = [timed(hook, "observe (canaries)") for hook in hooks]
        trainer.optimizer.step = timed(trainer.optimizer.step, "optimizer")
        batches = trainer.batches()
        try:
            for i in range(10):
                step, indices = next(batches)
                if i == 2:
                    totals.clear()
                sync()
                began = time.perf_counter()
                trainer.step(step, indices)
                sync()
                totals["WHOLE STEP"] += time.perf_counter() - began
        finally:
            T.next_token_logits, torch.Tensor.backward = forward, backward
        per_step = {k: round(v / 8 * 1e3, 2) for k, v in totals.items()}
        print(f"phases of {kind} (ms per step, 8 steps):", per_step, flush=True)
        if CUDA:
            step, indices = next(batches)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                trainer.step(step, indices)
                torch.cuda.set_sync_debug_mode(0)
            syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
            where = collections.Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs)
            print(f"{kind}: {len(syncs)} synchronising calls in one step:", dict(where), flush=True)


def profiler_tables() -> None:
    """4. torch.profiler over three DP steps, by CPU and by device time."""
    from torch.profiler import ProfilerActivity, profile

    trainer = build("dp", 8)
    batches = trainer.batches()
    for _ in range(2):
        trainer.step(*next(batches))
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            trainer.step(*next(batches))
        sync()
    averages = prof.key_averages()
    for key in ("self_cpu_time_total", "self_device_time_total", "self_cuda_time_total"):
        try:
            print(f"--- sorted by {key}\n" + averages.table(sort_by=key, row_limit=18), flush=True)
        except Exception:  # the key's name differs across torch versions
            continue


def main() -> None:
    global ARGS, DEV, CUDA
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=384)
    parser.add_argument("--steps", type=int, default=10)
    ARGS = parser.parse_args()
    DEV = torch.device(ARGS.device)
    CUDA = DEV.type == "cuda"
    print(
        "torch", torch.__version__, "| threads", torch.get_num_threads(), "| affinity",
        len(os.sched_getaffinity(0)), "| CUDA_MODULE_LOADING",
        os.environ.get("CUDA_MODULE_LOADING"), "| py threads", threading.active_count(),
    )  # fmt: skip
    variants()
    phases()
    if CUDA:
        profiler_tables()


if __name__ == "__main__":
    main()
