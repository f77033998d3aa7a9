"""Sound LMO-DP against Gaussian DP-SGD at equal (epsilon, delta), sampling rate and steps.

For each target epsilon both methods fine-tune the same base on the same data through the one
training loop (`lmo` and `dpsgd` controllers); the report gives each one's test perplexity,
their ratio (LMO / Gaussian; < 1 favours LMO), the epsilon each actually spent by its ledger,
and, labelled "paper's accounting, not a guarantee", what the LMO-DP authors' code would print
for the LMO law used (privacy.lmo_accounting.paper_epsilon). An epsilon no LMO law in the
searched grids can meet is reported as infeasible.

Uses the project's base model and prepared data under --root (`dvc repro base`). With
--quick and no base there, it runs the pipeline's own prepare and base stages at a reduced
size in a temporary project first (minutes on a CPU).

    python benchmarks/lmo_vs_gaussian.py [--epsilons 0.3 1 3] [--quick] [--root .]
        [--lmo-clips 0.1 1 10 100]

`--lmo-clips` runs LMO-DP at each L1 clip and keeps the one of least validation perplexity
(choosing on test perplexity would fit the test set); every clip's run stays in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_project_arguments, open_project, run_method  # noqa: E402
from privtune import io  # noqa: E402
from privtune.errors import ConfigError  # noqa: E402
from privtune.privacy.lmo_accounting import paper_epsilon  # noqa: E402
from privtune.train import make_plan, planned_records  # noqa: E402


def lmo_options(clip: float, grids: list[str]) -> list[dict[str, Any]]:
    return [{"clip": clip, "grid": grid} for grid in grids]


def run_one(params, root, method, options, data) -> dict[str, Any]:
    f = params.finetune
    row, result = run_method(params, root, method, options, data, epsilon=f.epsilon, seed=f.seed)
    row["target_epsilon"] = f.epsilon
    if method == "lmo":
        law = result.controller.lmo_params
        paper = paper_epsilon(law, result.plan.sample_rate, result.plan.steps, result.plan.delta)
        row["lmo_params"] = law.to_dict()
        row["lmo_noise_std"] = result.controller.noise_std
        row["paper_accounting_not_a_guarantee"] = {
            "per_step_epsilon": paper.per_step,
            "composed_no_subsampling": paper.composed_no_subsampling,
            "gaussian_proxy_epsilon": paper.gaussian_proxy,
        }
    else:
        row["noise_multiplier"] = result.plan.calibrated_noise
    return row


def chosen_clip(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The LMO run of least validation perplexity (the first on a tie); None if none ran."""
    return min(runs, key=lambda r: r["valid_perplexity"]) if runs else None


def fmt(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3g}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| target eps | Gaussian ppl | LMO ppl | LMO clip (of those run) | ratio LMO/Gauss | "
        "eps spent Gauss | eps spent LMO | paper's accounting, not a guarantee: per-step eps / "
        "Gaussian-proxy eps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g, lm = r["gaussian"], r["lmo"]
        tried = ", ".join(fmt(run["options"]["clip"]) for run in r.get("lmo_runs", []))
        if lm is None:
            ppl, clip, ratio, spent = "infeasible", f"- ({tried})", "-", "-"
            paper = r["lmo_infeasible"]
        else:
            clip = f"{fmt(lm['options']['clip'])} ({tried or fmt(lm['options']['clip'])})"
            ppl, ratio, spent = (
                fmt(lm["test_perplexity"]),
                fmt(r["ppl_ratio"]),
                fmt(lm["epsilon_spent"]),
            )
            p = lm["paper_accounting_not_a_guarantee"]
            paper = f"{fmt(p['per_step_epsilon'])} / {fmt(p['gaussian_proxy_epsilon'])}"
        cells = [fmt(r["epsilon"]), fmt(g["test_perplexity"]), ppl, clip, ratio]
        cells += [fmt(g["epsilon_spent"]), spent, paper]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    parser.add_argument("--clip", type=float, default=1.0, help="clip of both methods")
    parser.add_argument(
        "--lmo-clips",
        type=float,
        nargs="+",
        help="LMO-DP's L1 clips to try (default --clip), the one chosen on validation",
    )
    parser.add_argument("--grids", nargs="+", default=["paper", "extended"],
                        help="LMO search grids, tried in order until one is feasible")  # fmt: skip
    add_project_arguments(parser)
    args = parser.parse_args()
    params, root, data = open_project(args)
    rows = []
    for eps in args.epsilons:
        p = params.model_copy(update={"finetune": params.finetune.model_copy(
            update={"epsilon": eps})})  # fmt: skip
        f = p.finetune.model_copy(update={"audit_canaries": 0})  # as run_method trains
        plan = make_plan(planned_records(len(data.train), f), f, private=True)
        gaussian = run_one(p, root, "dpsgd", {"clip": args.clip}, data)
        lmo_runs, infeasible = [], None
        for clip in args.lmo_clips or [args.clip]:
            for options in lmo_options(clip, args.grids):
                try:
                    lmo_runs.append(run_one(p, root, "lmo", options, data))
                    break
                except ConfigError as err:
                    infeasible = f"infeasible for sound LMO ({options['grid']} grid): {err.problem}"
            else:  # the law's search does not depend on the clip: no other clip can fit
                break
        lmo = chosen_clip(lmo_runs)
        row = {
            "epsilon": eps,
            "delta": plan.delta,
            "sample_rate": plan.sample_rate,
            "steps": plan.steps,
            "gaussian": gaussian,
            "lmo": lmo,
            "lmo_runs": lmo_runs,
            "lmo_infeasible": None if lmo else infeasible,
            "ppl_ratio": lmo["test_perplexity"] / gaussian["test_perplexity"] if lmo else None,
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("gaussian", "lmo", "lmo_runs")}
                         | {"gauss_ppl": gaussian["test_perplexity"],
                            "lmo_ppl": lmo and lmo["test_perplexity"]}), flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    name = "lmo_vs_gaussian" + ("_quick" if args.quick else "")
    io.write_json(args.out / f"{name}.json", {"quick": args.quick, "rows": rows})
    table = markdown(rows)
    with io.atomic_file(args.out / f"{name}.md") as handle:
        handle.write(f"# Sound LMO-DP vs Gaussian DP-SGD{' (--quick)' if args.quick else ''}\n\n")
        handle.write(table)
    print(table)


if __name__ == "__main__":
    main()
