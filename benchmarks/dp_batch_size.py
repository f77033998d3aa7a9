"""The logical batch under DP on a real model: DP-SGD on a profile's SmolLM2 project at its
(ε, δ) and epochs, one (batch, learning rate) after another, side by side in one process.

At a fixed ε and number of passes over the data, a batch B at rate q = B/N takes E/q steps,
and the accountant's noise multiplier z grows with q, roughly as sqrt(q) for small q: the noise
on the averaged gradient, z C / B, shrinks as 1/sqrt(B), while the steps fall as 1/B. Whether
fewer, cleaner steps beat more, noisier ones is what this measures, at equal compute (every
run sees the same number of records). A larger batch may want a larger rate (a cleaner
gradient tolerates longer steps), so rates are crossed with batches; each pair is judged on
validation perplexity, the test perplexity is reported beside it.

    python benchmarks/dp_batch_size.py [--profile smollm2-cpu-attacks] --epochs 2 \
        --grid 16:0.01 32:0.01 32:0.02 64:0.01 64:0.02 64:0.04
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_profile_arguments, open_profile, run_method  # noqa: E402
from dp_learning_rate import chosen  # noqa: E402
from privtune import io  # noqa: E402


def pair(text: str) -> tuple[int, float]:
    """`B:lr` on the command line: a logical batch and a learning rate."""
    batch, _, lr = text.partition(":")
    try:
        return int(batch), float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not BATCH:RATE (e.g. 32:0.02)") from None


def markdown(runs: list[dict]) -> str:
    best = chosen(runs)
    lines = [
        "| batch | q | learning rate | steps | noise multiplier | test ppl | valid ppl "
        "| ε spent | s / step (CPU) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        mark = " (chosen)" if r is best else ""
        lines.append(
            f"| {r['batch_size']} | {r['sample_rate']:.3f} | {r['lr']:g}{mark} | {r['steps']} | "
            f"{r['noise_multiplier']:.2f} | {r['test_perplexity']:.2f} | "
            f"{r['valid_perplexity']:.2f} | {r['epsilon_spent']:.2f} | "
            f"{r['loop_cpu_seconds_per_step']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], base_ppl: float | None, path: Path) -> None:
    """Validation perplexity against records seen (equal compute on the x axis)."""
    fig, ax = plt.subplots(figsize=(8.5, 4))
    for r in runs:
        steps, losses = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        seen = [(s + 1) * r["batch_size"] for s in steps]  # after step s (from 0)
        label = f"batch {r['batch_size']}, lr {r['lr']:g}"
        ax.plot(seen, [math.exp(loss) for loss in losses], marker="o", label=label)
    if base_ppl:
        ax.axhline(base_ppl, color="grey", linestyle="--", label="base (test)")
    ax.set_xlabel("records seen (expected: steps taken x batch)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"DP-SGD at ε = {runs[0]['epsilon']:g}: logical batch and learning rate")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser)
    parser.add_argument("--method", default="dpsgd", help="a method entry of the profile")
    parser.add_argument(
        "--grid", type=pair, nargs="+", default=[(16, 0.01), (32, 0.01), (32, 0.02)],
        help="BATCH:RATE pairs",
    )  # fmt: skip
    parser.add_argument("--base-perplexity", type=float, help="drawn as a line (README's)")
    args = parser.parse_args()
    params, root, data = open_profile(args)
    method, options = params.method(args.method)
    setup = {"profile": args.profile, "method": args.method,
             "epochs": args.epochs or params.finetune.epochs, "seed": args.seed}  # fmt: skip
    runs = []
    for batch, lr in args.grid:
        update = {"lr": lr, "batch_size": batch, "physical_batch_size": args.physical_batch_size}
        tuned = params.model_copy(update={"finetune": params.finetune.model_copy(update=update)})
        row, result = run_method(
            tuned, root, method, dict(options), data, epsilon=params.finetune.epsilon,
            seed=args.seed, entry=args.method, epochs=args.epochs, downstream=False,
            eval_every=max(1, 160 // batch),  # about every 160 records, whatever the batch
        )  # fmt: skip
        z = result.plan.calibrated_noise
        runs.append(row | {"lr": lr, "batch_size": batch, "noise_multiplier": z})
        io.write_json(args.out / "dp_batch_size_runs.json", runs)  # partial results
        test, valid = row["test_perplexity"], row["valid_perplexity"]
        print(f"batch {batch}, lr {lr:g}: test ppl {test:.2f}, valid {valid:.2f}", flush=True)
    best = chosen(runs)
    io.write_json(
        args.out / "dp_batch_size.json",
        setup | {"chosen": [best["batch_size"], best["lr"]], "runs": runs},
    )
    (args.out / "dp_batch_size_runs.json").unlink(missing_ok=True)
    table = markdown(runs)
    with io.atomic_file(args.out / "dp_batch_size.md") as handle:
        handle.write(table)
    plot(runs, args.base_perplexity, args.out / "dp_batch_size.png")
    print(table)


if __name__ == "__main__":
    main()
