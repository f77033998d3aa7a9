"""Cost of privacy per step: a DP-SGD LoRA step against a non-private LoRA step.

Both run side by side in one process (interleaved, same batches) so the machine's noise hits
both alike; peak memory is measured for each in its own subprocess. On a GPU, the same is
measured on a GPT-2-small-sized model. Writes benchmarks/results/step_overhead.json.

    make bench            # or: python benchmarks/step_overhead.py [--steps 30] [--gpt2-small]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from opacus import GradSampleModule

from privtune.config import BaseParams, LoraParams, load_params
from privtune.losses import next_token_logits, per_sample_loss
from privtune.modeling import adapter_groups, attach_lora, build_gpt2
from privtune.privacy.mechanisms import GaussianMechanism, uniform_noise_stds
from privtune.train import freeze_dropout

GPT2_SMALL = BaseParams(n_layer=12, n_head=12, n_embd=768, max_length=256, vocab_size=50257)
RESULTS = Path(__file__).parent / "results"


def make_model(base: BaseParams, lora: LoraParams, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = attach_lora(build_gpt2(base, base.vocab_size, 0, 0), lora).to(device)
    freeze_dropout(model)  # exactly as the training loop runs it
    return model


class Stepper:
    """One optimizer step of either kind on a fixed batch."""

    def __init__(self, private: bool, base: BaseParams, lora: LoraParams, device, batch: int):
        self.private, self.device = private, device
        self.model = make_model(base, lora, device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-3)
        self.forward = self.model
        if private:
            self.forward = GradSampleModule(self.model, batch_first=True, loss_reduction="sum")
            _, groups = adapter_groups(self.model, "flat")
            self.mechanism = GaussianMechanism(groups, torch.Generator().manual_seed(0))
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(base.vocab_size, (batch, base.max_length), generator=generator)
        self.batch = {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
        }
        self.labels = ids.to(device)
        self.expected = float(batch)

    def step(self) -> None:
        logits = next_token_logits(self.forward, **self.batch)  # as the training loop does
        per_sample_loss(logits, self.labels).sum().backward()
        if self.private:
            self.mechanism.step([1.0], uniform_noise_stds([1.0], 1.0), self.expected)
        else:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad /= self.expected
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def time_side_by_side(base, lora, device, batch: int, steps: int) -> dict[str, float]:
    steppers = {
        "dp": Stepper(True, base, lora, device, batch),
        "nonprivate": Stepper(False, base, lora, device, batch),
    }
    for stepper in steppers.values():  # warm-up
        for _ in range(3):
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
    return {"dp_step_s": dp, "nonprivate_step_s": plain, "time_ratio": dp / plain}


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


def peak_memory_child(kind: str, config: str, device: str, batch: int) -> None:
    """Run in a subprocess: report the peak memory growth of a few steps of one kind."""
    base = GPT2_SMALL if config == "gpt2-small" else load_params().base
    dev = torch.device(device)
    stepper = Stepper(kind == "dp", base, load_params().finetune.lora, dev, batch)
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


def peak_memory(kind: str, config: str, device: str, batch: int) -> int:
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
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def measure(config: str, device: torch.device, batch: int, steps: int) -> dict:
    params = load_params()
    base = GPT2_SMALL if config == "gpt2-small" else params.base
    result = {
        "config": config,
        "device": str(device),
        "batch": batch,
        "seq_len": base.max_length,
        "n_layer": base.n_layer,
        "n_embd": base.n_embd,
    }
    result |= time_side_by_side(base, params.finetune.lora, device, batch, steps)
    dp_mem = peak_memory("dp", config, str(device), batch)
    plain_mem = peak_memory("nonprivate", config, str(device), batch)
    result |= {
        "dp_peak_bytes": dp_mem,
        "nonprivate_peak_bytes": plain_mem,
        "memory_ratio": dp_mem / plain_mem,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--gpt2-small", action="store_true", help="also on CPU (slow)")
    parser.add_argument("--memory-child", choices=["dp", "nonprivate"])
    parser.add_argument("--config", default="default")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child, args.config, args.device, args.batch)
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    runs = [measure("default", device, args.batch, args.steps)]
    if cuda or args.gpt2_small:
        runs.append(measure("gpt2-small", device, 8 if not cuda else args.batch, args.steps))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "step_overhead.json"
    out.write_text(json.dumps({"runs": runs, "target_time_ratio": 1.2}, indent=2) + "\n")
    for run in runs:
        print(
            f"{run['config']:>10} on {run['device']}: DP/non-private step time "
            f"{run['time_ratio']:.3f} (target <= 1.2), peak memory {run['memory_ratio']:.3f} "
            f"[{run['dp_step_s'] * 1e3:.1f} ms vs {run['nonprivate_step_s'] * 1e3:.1f} ms]"
        )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
