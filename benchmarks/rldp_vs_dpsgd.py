"""RLDP against DP-SGD at equal (epsilon, delta) and step budget, side by side.

For each epsilon and seed both methods fine-tune the same base on the same data through the one
training loop; the report gives the test perplexity ratio (RLDP / DP-SGD, mean and spread),
medication accuracy, the steps RLDP needs to reach DP-SGD's final validation loss, and the
wall-clock ratio of an RLDP step to a DP-SGD step. Needs `dvc repro base` first.

    python benchmarks/rldp_vs_dpsgd.py [--epsilons 1 4 8] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from privtune import io  # noqa: E402
from privtune.config import BASE_DIR, PREPARED_DIR, load_params  # noqa: E402
from privtune.data.tokenization import encode_records  # noqa: E402
from privtune.evaluate import evaluate_model  # noqa: E402
from privtune.modeling import attach_lora, load_pretrained  # noqa: E402
from privtune.train import train  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def run_one(params, method, options, epsilon, seed, data) -> dict:
    train_data, valid_data, test_records = data
    model, tokenizer = load_pretrained(BASE_DIR, field=str(BASE_DIR))
    f = params.finetune.model_copy(update={"epsilon": epsilon, "seed": seed, "eval_every": 10})
    model = attach_lora(model, f.lora, seed=seed)
    start = time.perf_counter()
    result = train(model, train_data, valid_data, f, method, options, show_progress=False)
    seconds = time.perf_counter() - start
    metrics = evaluate_model(model, tokenizer, test_records, params.base.max_length)
    curve = [(r["step"], r["valid_loss"]) for r in result.history if "valid_loss" in r]
    return {
        "method": method,
        "epsilon": epsilon,
        "seed": seed,
        "epsilon_spent": result.epsilon,
        "steps": result.steps_taken,
        "seconds_per_step": seconds / result.steps_taken,
        "curve": curve,
        **metrics,
    }


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


def summarise(runs: list[dict], epsilons, seeds) -> list[dict]:
    rows = []
    for eps in epsilons:
        pairs = []
        for seed in seeds:
            d = next(
                r
                for r in runs
                if r["method"] == "dpsgd" and (r["epsilon"], r["seed"]) == (eps, seed)
            )
            r = next(
                r
                for r in runs
                if r["method"] == "rldp" and (r["epsilon"], r["seed"]) == (eps, seed)
            )
            pairs.append((d, r))
        ratios = [r["test_perplexity"] / d["test_perplexity"] for d, r in pairs]
        reach = [steps_to_reach(r["curve"], d["curve"][-1][1]) for d, r in pairs]
        rows.append(
            {
                "epsilon": eps,
                "ppl_ratio_mean": statistics.mean(ratios),
                "ppl_ratio_min": min(ratios),
                "ppl_ratio_max": max(ratios),
                "dpsgd_ppl": statistics.mean(d["test_perplexity"] for d, _ in pairs),
                "rldp_ppl": statistics.mean(r["test_perplexity"] for _, r in pairs),
                "dpsgd_med_acc": statistics.mean(d["medication_accuracy"] for d, _ in pairs),
                "rldp_med_acc": statistics.mean(r["medication_accuracy"] for _, r in pairs),
                "rldp_steps_to_dpsgd_final": reach,
                "dpsgd_steps": pairs[0][0]["steps"],
                "step_time_ratio": statistics.mean(
                    r["seconds_per_step"] / d["seconds_per_step"] for d, r in pairs
                ),
                "max_epsilon_spent": max(x["epsilon_spent"] for pair in pairs for x in pair),
            }
        )
    return rows


def plot(runs, rows, path: Path) -> None:
    fig, (ax_ratio, ax_curve) = plt.subplots(1, 2, figsize=(11, 4))
    eps = [row["epsilon"] for row in rows]
    mean = [row["ppl_ratio_mean"] for row in rows]
    err = [
        [m - row["ppl_ratio_min"] for m, row in zip(mean, rows, strict=True)],
        [row["ppl_ratio_max"] - m for m, row in zip(mean, rows, strict=True)],
    ]
    ax_ratio.errorbar(eps, mean, yerr=err, marker="o", capsize=4)
    ax_ratio.axhline(1.0, color="gray", linestyle="--")
    ax_ratio.set(
        xscale="log",
        xlabel="epsilon",
        ylabel="test perplexity RLDP / DP-SGD",
        title="Lower is better for RLDP (min-max over seeds)",
    )
    for run in runs:
        if run["seed"] == runs[0]["seed"]:
            steps, losses = zip(*run["curve"], strict=True)
            style = "-" if run["method"] == "rldp" else "--"
            ax_curve.plot(steps, losses, style, label=f"{run['method']} eps={run['epsilon']}")
    ax_curve.set(xlabel="step", ylabel="validation loss (nats/token)", title="Learning curves")
    ax_curve.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rldp", type=json.loads, default={}, help="RLDP options as JSON")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    params = load_params()
    _, tokenizer = load_pretrained(BASE_DIR, field=str(BASE_DIR))
    split = {n: io.read_jsonl(PREPARED_DIR / f"{n}.jsonl") for n in ("train", "valid", "test")}
    data = (
        encode_records([r["text"] for r in split["train"]], tokenizer, params.base.max_length),
        encode_records([r["text"] for r in split["valid"]], tokenizer, params.base.max_length),
        split["test"],
    )
    runs = []
    for eps in args.epsilons:
        for seed in args.seeds:
            for method, options in (("dpsgd", {"clip": 1.0}), ("rldp", args.rldp)):
                runs.append(run_one(params, method, options, eps, seed, data))
                io.write_json(args.out / "rldp_vs_dpsgd_runs.json", runs)  # partial results
                last = runs[-1]
                print(
                    f"{method:>6} eps={eps:<4} seed={seed} ppl={last['test_perplexity']:.1f} "
                    f"spent={last['epsilon_spent']:.3f} "
                    f"{last['seconds_per_step'] * 1e3:.0f} ms/step",
                    flush=True,
                )
    rows = summarise(runs, args.epsilons, args.seeds)
    io.write_json(args.out / "rldp_vs_dpsgd.json", {"rows": rows, "runs": runs})
    plot(runs, rows, args.out / "rldp_vs_dpsgd.png")
    for row in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))


if __name__ == "__main__":
    main()
