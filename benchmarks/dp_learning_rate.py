"""The learning rate under DP on a real model: DP-SGD on a profile's SmolLM2 project at its
(ε, δ), one learning rate after another, side by side in one process.

AdamW, the loop's optimizer, scales each coordinate's step to about the rate whatever the
gradient's size: under DP the noised gradient is mostly noise, so the rate that suits
non-private LoRA (0.01) may walk the private adapters away at random. Every run fine-tunes
the same converted base on the same notes with the same seed, sampling rate, steps and
clipping; only the rate differs. The rate is chosen on the validation perplexity; the test
perplexity is reported beside it.

Tuning on private data is itself a release that ε does not cover (Papernot and Steinke, 2022):
tune on public or synthetic notes like this project's, then fix the rate for the private run.

    python benchmarks/dp_learning_rate.py [--profile smollm2-cpu-attacks] [--lrs 0.01 0.003 0.001]
    python benchmarks/dp_learning_rate.py --add --clip 0.1 --lrs 0.01   # and at another clip
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
from privtune import io  # noqa: E402


def chosen(runs: list[dict]) -> dict:
    """The run of least validation perplexity (the first, on a tie)."""
    return min(runs, key=lambda r: r["valid_perplexity"])


def clip(run: dict) -> float | None:
    """The run's clipping threshold (its method options'; None for a method without one)."""
    return run["options"].get("clip")


def clip_text(run: dict) -> str:
    """The clip as the table and the plot show it ("–" for a method without one)."""
    return "–" if clip(run) is None else f"{clip(run):g}"


def kept_runs(path: Path, setup: dict, pairs: list[tuple[float, float | None]]) -> list[dict]:
    """The runs of an earlier result at other (rate, clip) pairs, if it had this setup (runs
    are deterministic: a pair run again gives the same row)."""
    if not path.is_file():
        return []
    earlier = io.read_json(path)
    if {k: earlier.get(k) for k in setup} != setup:
        raise SystemExit(f"{path} is of another setup ({earlier.get('profile')}): drop --add")
    return [r for r in earlier["runs"] if (r["lr"], clip(r)) not in pairs]


def markdown(runs: list[dict]) -> str:
    best = chosen(runs)
    lines = [
        "| clip | learning rate | test ppl | valid ppl | ε spent | steps | s / step (CPU) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        mark = " (chosen)" if r is best else ""
        lines.append(
            f"| {clip_text(r)} | {r['lr']:g}{mark} | {r['test_perplexity']:.2f} | "
            f"{r['valid_perplexity']:.2f} | {r['epsilon_spent']:.2f} | {r['steps']} | "
            f"{r['loop_cpu_seconds_per_step']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], base_ppl: float | None, path: Path) -> None:
    """Validation perplexity along each run: where the noise takes over shows as a rise."""
    fig, ax = plt.subplots(figsize=(8.5, 4))
    starts = [math.exp(r["curve"][0][1]) for r in runs if r["curve"]]
    top = 1.5 * max([*starts, base_ppl or 0.0])  # a diverging rate would hide the others
    clips = {clip(r) for r in runs}
    for r in runs:
        steps, losses = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        label = f"lr {r['lr']:g}" + (f", clip {clip_text(r)}" if len(clips) > 1 else "")
        if r["valid_perplexity"] > top:
            label += f" (off the chart: {r['valid_perplexity']:,.0f})"
        ax.plot(steps, [math.exp(loss) for loss in losses], marker="o", label=label)
    if base_ppl:
        ax.axhline(base_ppl, color="grey", linestyle="--", label="base (test)")
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity")
    ax.set_ylim(0, top)
    ax.set_title(f"DP-SGD at ε = {runs[0]['epsilon']:g}: learning rate and clip")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser)
    parser.add_argument("--method", default="dpsgd", help="a method entry of the profile")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.003, 0.001])
    parser.add_argument("--clip", type=float, help="the clipping threshold (the method's)")
    parser.add_argument("--base-perplexity", type=float, help="drawn as a line (README's)")
    parser.add_argument(
        "--add", action="store_true", help="keep the JSON's other (rate, clip) runs (same setup)"
    )
    args = parser.parse_args()
    params, root, data = open_profile(args)
    method, options = params.method(args.method)
    if args.clip is not None:
        if "clip" not in options:
            raise SystemExit(f"method entry '{args.method}' has no clip option: drop --clip")
        options = {**options, "clip": args.clip}
    setup = {"profile": args.profile, "method": args.method,
             "epochs": args.epochs or params.finetune.epochs, "seed": args.seed}  # fmt: skip
    pairs = [(lr, options.get("clip")) for lr in args.lrs]
    runs = kept_runs(args.out / "dp_learning_rate.json", setup, pairs) if args.add else []
    for lr in args.lrs:
        update = {"lr": lr, "physical_batch_size": args.physical_batch_size}
        tuned = params.model_copy(update={"finetune": params.finetune.model_copy(update=update)})
        row, _ = run_method(
            tuned, root, method, dict(options), data, epsilon=params.finetune.epsilon,
            seed=args.seed, entry=args.method, epochs=args.epochs, downstream=False,
        )  # fmt: skip
        runs.append(row | {"lr": lr})
        io.write_json(args.out / "dp_learning_rate_runs.json", runs)  # partial results
        test, valid = row["test_perplexity"], row["valid_perplexity"]
        print(f"lr {lr:g}: test ppl {test:.2f}, valid ppl {valid:.2f}", flush=True)
    runs.sort(key=lambda r: (-(clip(r) or 0.0), -r["lr"]))
    best = chosen(runs)
    io.write_json(
        args.out / "dp_learning_rate.json",
        setup | {"chosen_lr": best["lr"], "chosen_clip": clip(best), "runs": runs},
    )
    (args.out / "dp_learning_rate_runs.json").unlink(missing_ok=True)
    table = markdown(runs)
    with io.atomic_file(args.out / "dp_learning_rate.md") as handle:
        handle.write(table)
    plot(runs, args.base_perplexity, args.out / "dp_learning_rate.png")
    print(table)


if __name__ == "__main__":
    main()
