"""Every method of params.yaml at equal (epsilon, delta), sampling rate and steps, over an
epsilon grid and several seeds: the comparison the default pipeline is too small to settle.

Each (method, epsilon, seed) fine-tunes the same base on the same data through the one training
loop; the table gives the test perplexity (mean and standard deviation over seeds), its ratio
to DP-SGD's at the same epsilon and seed, medication accuracy and the largest epsilon any run
spent (never above the target). The non-private model is run once per seed, as the ceiling.
Needs `dvc repro base` (or --quick, which builds a reduced project first).

    python benchmarks/methods_grid.py [--epsilons 1 4 8] [--seeds 0 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_grid_arguments,
    add_project_arguments,
    mean_spread,
    open_project,
    run_method,
)
from privtune import io  # noqa: E402
from privtune.control.registry import controller_class  # noqa: E402


def summarise(runs: list[dict], epsilons: list[float], seeds: list[int]) -> list[dict]:
    """One row per (entry, epsilon): utility over seeds, paired with DP-SGD's."""
    rows = []
    entries = list(dict.fromkeys(r["entry"] for r in runs))
    for entry in entries:
        private = any(r["entry"] == entry and r["epsilon_spent"] is not None for r in runs)
        for eps in epsilons if private else [None]:
            mine = [r for r in runs if r["entry"] == entry and r["epsilon"] == eps]
            if not mine:
                continue
            ppl = mean_spread([r["test_perplexity"] for r in mine])
            row = {
                "entry": entry,
                "method": mine[0]["method"],
                "epsilon": eps,
                "seeds": len(mine),
                "test_perplexity_mean": ppl[0],
                "test_perplexity_sd": ppl[1],
                "medication_accuracy_mean": mean_spread([r["medication_accuracy"] for r in mine])[
                    0
                ],
                "max_epsilon_spent": max(
                    (r["epsilon_spent"] for r in mine if r["epsilon_spent"] is not None),
                    default=None,
                ),
                "seconds_per_step": mean_spread([r["seconds_per_step"] for r in mine])[0],
            }
            baseline = {r["seed"]: r for r in runs if r["entry"] == "dpsgd" and r["epsilon"] == eps}
            ratios = [
                r["test_perplexity"] / baseline[r["seed"]]["test_perplexity"]
                for r in mine
                if r["seed"] in baseline
            ]
            if private and ratios:
                row["ppl_ratio_to_dpsgd_mean"], row["ppl_ratio_to_dpsgd_sd"] = mean_spread(ratios)[
                    :2
                ]
            rows.append(row)
    return rows


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def grid_epsilons(rows: list[dict]) -> list[float]:
    """The grid's target ε, in order (the non-private rows claim none)."""
    return sorted({r["epsilon"] for r in rows if r["epsilon"] is not None})


def markdown(rows: list[dict]) -> str:
    """One line per method: test perplexity (mean ± sd over seeds) at each ε, its ratio to
    DP-SGD's (paired by seed), the largest ε any of its runs spent and medication accuracy."""
    epsilons = grid_epsilons(rows)
    grid = ", ".join(fmt(e) for e in epsilons)
    lines = [
        "| method | "
        + " | ".join(f"ε = {fmt(e)}" for e in epsilons)
        + f" | / DP-SGD at ε {grid} (mean ± sd) | max ε spent | medication accuracy |",
        "|---|" + "---|" * len(epsilons) + "---|---|---|",
    ]
    for entry in dict.fromkeys(r["entry"] for r in rows):
        mine = {r["epsilon"]: r for r in rows if r["entry"] == entry}
        # one value when every ε gives the same (a task the runs do not move), else one per ε
        # in the columns' order ('-' where a point did not run)
        accuracies = [
            fmt(mine[e]["medication_accuracy_mean"], ".3f") if e in mine else "-"
            for e in ([None] if None in mine else epsilons)
        ]
        accuracy = accuracies[0] if len(set(accuracies)) == 1 else ", ".join(accuracies)
        if None in mine:  # non-private: one run per seed, no ε claimed
            r = mine[None]
            ppl = f"{fmt(r['test_perplexity_mean'], '.1f')} ± {fmt(r['test_perplexity_sd'], '.1f')}"
            cells = [f"{ppl} (no ε)", *[""] * (len(epsilons) - 1), "", "-", accuracy]
        else:
            ppl = [
                f"{fmt(mine[e]['test_perplexity_mean'], '.1f')} ± "
                f"{fmt(mine[e]['test_perplexity_sd'], '.1f')}"
                if e in mine
                else "-"
                for e in epsilons
            ]
            ratios = [
                "-"
                if mine.get(e, {}).get("ppl_ratio_to_dpsgd_mean") is None
                else f"{mine[e]['ppl_ratio_to_dpsgd_mean']:.3f} ± "
                f"{mine[e]['ppl_ratio_to_dpsgd_sd']:.3f}"
                for e in epsilons
            ]
            spent = ", ".join(
                fmt(mine[e]["max_epsilon_spent"], ".3f") if e in mine else "-" for e in epsilons
            )
            cells = [*ppl, "; ".join(ratios) if entry != "dpsgd" else "1", spent, accuracy]
        lines.append(f"| {entry} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry in dict.fromkeys(r["entry"] for r in rows):
        mine = [r for r in rows if r["entry"] == entry]
        if mine[0]["epsilon"] is None:
            ax.axhline(mine[0]["test_perplexity_mean"], color="grey", linestyle="--",
                       label=f"{entry} (ε = ∞)")  # fmt: skip
            continue
        ax.errorbar(
            [r["epsilon"] for r in mine],
            [r["test_perplexity_mean"] for r in mine],
            yerr=[r["test_perplexity_sd"] for r in mine],
            marker="o",
            capsize=3,
            label=entry,
        )
    ax.set(xscale="log", xlabel="target ε (spent ≤ target)",
           ylabel="test perplexity (mean ± sd over seeds)",
           title="Every method at equal (ε, δ), q and steps")  # fmt: skip
    epsilons = grid_epsilons(rows)
    ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the grid's ε
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid_arguments(parser)
    parser.add_argument("--methods", nargs="+", help="entries of params.yaml `methods` (all)")
    add_project_arguments(parser)
    args = parser.parse_args()
    params, root, data = open_project(args)
    entries = args.methods or list(params.methods)
    name = "methods_grid" + ("_quick" if args.quick else "")
    runs: list[dict] = []
    for seed in args.seeds:
        for entry in entries:
            method, options = params.method(entry)
            private = controller_class(method, entry).private
            for eps in args.epsilons if private else [params.finetune.epsilon]:
                run, _ = run_method(params, root, method, options, data, epsilon=eps, seed=seed,
                                    entry=entry, epochs=args.epochs)  # fmt: skip
                if not private:
                    run["epsilon"] = None  # no epsilon claimed
                runs.append(run)
                io.write_json(args.out / f"{name}_runs.json", runs)  # partial results
                print(f"{entry:>12} eps={eps:<4} seed={seed} ppl={run['test_perplexity']:.1f} "
                      f"spent={fmt(run['epsilon_spent'])} {run['seconds_per_step']:.2f} s/step",
                      flush=True)  # fmt: skip
    rows = summarise(runs, args.epsilons, args.seeds)
    io.write_json(args.out / f"{name}.json", {"quick": args.quick, "rows": rows, "runs": runs})
    plot(rows, args.out / f"{name}.png")
    table = markdown(rows)
    with io.atomic_file(args.out / f"{name}.md") as handle:
        handle.write(f"# Every method at equal (ε, δ){' (--quick)' if args.quick else ''}\n\n")
        handle.write(table)
    print(table)
    print(json.dumps({"results": str(args.out / f"{name}.md")}))


if __name__ == "__main__":
    main()
