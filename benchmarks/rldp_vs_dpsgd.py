"""RLDP against DP-SGD at equal (epsilon, delta) and step budget, side by side.

For each epsilon and seed both methods fine-tune the same base on the same data through the one
training loop; the report gives the test perplexity ratio (RLDP / DP-SGD, mean and spread),
medication accuracy, the steps RLDP needs to reach DP-SGD's final validation loss, and the
wall-clock ratio of an RLDP step to a DP-SGD step. Needs `dvc repro base` first (or --quick).
The JSON's ``summary`` maps each epsilon to the mean RLDP / DP-SGD test-perplexity ratio.

``--ablation`` runs RLDP's variants instead (ABLATION: the anchor alone, the policy on one
dimension, the full policy, deciding every 10 or 20 steps, the policy with the DP norm
histogram) beside DP-SGD, so a gain can be traced to the anchor or the policy (test
perplexity only: the downstream task is skipped), with ``--baselines`` static methods beside
them and ``--public-episodes N`` RLDP warm-started from a policy trained on public data;
``--reuse`` takes runs of the same method, options (defaults filled in: ``resolved_options``,
recorded by runs since the DP norm histogram became opt-in), epsilon, seed and length from an
earlier benchmark's JSON instead of running them again (the runs are seeded), if they ran
today's code (``source``: git's hashes of src/ and benchmarks/common.py, clean);
``--reuse-any-source`` also takes runs of other or unrecorded code, and marks them
(``reused_source``) and says so.

    python benchmarks/rldp_vs_dpsgd.py [--epsilons 1 4 8] [--seeds 0 1 2] [--quick]
    python benchmarks/rldp_vs_dpsgd.py --ablation --epsilons 4 --seeds 0 1 \
        --reuse benchmarks/results/rldp_vs_dpsgd.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_grid_arguments,
    add_project_arguments,
    open_project,
    resolved_options,
    run_method,
    same_source,
    source_version,
)
from privtune import io  # noqa: E402

# key -> (label, RLDP options over the defaults, methods.rldp): where a gain comes from.
ABLATION = {
    "anchor": ("anchor alone (per-adapter AUTO-S, paced noise)", {"policy": False}),
    "flat_anchor": (
        "anchor alone on one group (flat AUTO-S, paced noise)",
        {"policy": False, "groups": "flat"},
    ),
    "clip_anchor": (
        "anchor alone, per-adapter clipping (paced noise)",
        {"policy": False, "anchor": "clip"},
    ),
    "thresholds": ("anchor + policy on thresholds only", {"noise_bounds": [1.0, 1.0]}),
    "noise": ("anchor + policy on noise only", {"clip_bounds": [1.0, 1.0]}),
    "full": ("anchor + policy (RLDP)", {}),
    # fewer decisions: each interval's own noise moves the validation loss less against the
    # action's effect, and the policy has fewer chances to leave the anchor
    "interval10": ("anchor + policy deciding every 10 steps", {"rl_interval": 10}),
    "interval20": ("anchor + policy deciding every 20 steps", {"rl_interval": 20}),
    # the policy also observing the DP norm histogram of per-sample gradient norms (RLDP's
    # default before it cost more than it returned: README, "Longer runs")
    "histogram": (
        "anchor + policy with the DP norm histogram",
        {"norm_levels": [0.5, 1.0, 2.0]},
    ),
}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


def step_ratio(run: dict, base: dict, cpu: bool = False) -> float:
    """``run``'s time per step over ``base``'s: the step loop's (wall or CPU seconds), or the
    whole train() call's for runs saved before the loop was timed."""
    keys = (
        ("loop_cpu_seconds_per_step", "cpu_seconds_per_step") if cpu else ("loop_seconds_per_step",)
    )
    key = next((k for k in keys if k in run and k in base), "seconds_per_step")
    return run[key] / base[key]


def summarise(runs: list[dict], epsilons, seeds) -> list[dict]:
    rows = []
    for eps in epsilons:
        pairs = []
        for seed in seeds:
            found = {
                r["method"]: r for r in runs if (r["epsilon"], r["seed"]) == (eps, seed)
            }  # fmt: skip
            if "dpsgd" in found and "rldp" in found:  # (--reuse-only: pairs that ran)
                pairs.append((found["dpsgd"], found["rldp"]))
        if not pairs:
            continue
        ratios = [r["test_perplexity"] / d["test_perplexity"] for d, r in pairs]
        reach = [steps_to_reach(r["curve"], d["curve"][-1][1]) for d, r in pairs]
        rows.append(
            {
                "epsilon": eps,
                "seeds": [d["seed"] for d, _ in pairs],
                "ppl_ratio_mean": statistics.mean(ratios),
                "ppl_ratio_min": min(ratios),
                "ppl_ratio_max": max(ratios),
                "dpsgd_ppl": statistics.mean(d["test_perplexity"] for d, _ in pairs),
                "rldp_ppl": statistics.mean(r["test_perplexity"] for _, r in pairs),
                "dpsgd_med_acc": statistics.mean(d["medication_accuracy"] for d, _ in pairs),
                "rldp_med_acc": statistics.mean(r["medication_accuracy"] for _, r in pairs),
                "rldp_steps_to_dpsgd_final": reach,
                "dpsgd_steps": pairs[0][0]["steps"],
                "step_time_ratio": statistics.mean(step_ratio(r, d) for d, r in pairs),
                "step_cpu_ratio": statistics.mean(step_ratio(r, d, cpu=True) for d, r in pairs),
                # RLDP's decisions (validation, policy, admission) as a share of its loop's CPU
                # time: measured in the same process as its steps, so load hits both alike
                "rldp_decision_cpu_share": statistics.mean(
                    r.get("decision_cpu_seconds_per_step", math.nan)
                    / r.get("loop_cpu_seconds_per_step", math.nan)
                    for _, r in pairs
                ),
                "max_epsilon_spent": max(x["epsilon_spent"] for pair in pairs for x in pair),
                "paired": [
                    paired(d, r) for d, r in pairs if "record_scores" in d and "record_scores" in r
                ],
            }
        )
    return rows


def paired(dpsgd: dict, rldp: dict) -> dict:
    """RLDP's test perplexity minus DP-SGD's at one seed, with the 95 % paired-bootstrap
    interval over the test notes both were scored on: how much of a seed's gap is which notes
    the test split holds. The spread across seeds is the training's own randomness."""
    return {
        "seed": rldp["seed"],
        "dpsgd_ppl": dpsgd["test_perplexity"],
        "rldp_ppl": rldp["test_perplexity"],
        **difference(rldp, dpsgd, "rldp", "dpsgd"),
    }


def difference(run: dict, reference: dict, *names: str) -> dict:
    """``run``'s test perplexity minus ``reference``'s, paired over the test notes both were
    scored on (95 % bootstrap interval; ``names`` seed the bootstrap)."""
    from privtune.record_scores import RecordScores, paired_difference, seed_of

    mine, theirs = (
        RecordScores.from_dict(r["record_scores"]["test_perplexity"]) for r in (run, reference)
    )
    diff = paired_difference(mine, theirs, seed=seed_of(*names, str(run["seed"])))
    return {"difference": diff.difference, "low": diff.low, "high": diff.high,
            "records": diff.records}  # fmt: skip


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
    add_grid_arguments(parser)
    parser.add_argument("--rldp", type=json.loads, default=None,
                        help="RLDP options as JSON (default: methods.rldp)")  # fmt: skip
    parser.add_argument("--ablation", action="store_true",
                        help="run RLDP's ablation variants (ABLATION) beside DP-SGD")  # fmt: skip
    parser.add_argument("--reuse-only", action="store_true",
                        help="with --reuse: run nothing, report the runs found")  # fmt: skip
    parser.add_argument("--variants", nargs="+", choices=list(ABLATION), default=list(ABLATION),
                        help="with --ablation: which variants")  # fmt: skip
    parser.add_argument("--reuse", type=Path, default=None,
                        help="an earlier JSON whose matching runs (same options, same code) "
                        "are reused")  # fmt: skip
    parser.add_argument("--reuse-any-source", action="store_true",
                        help="with --reuse: also runs of other code (marked)")  # fmt: skip
    parser.add_argument("--baselines", nargs="+", default=[],
                        help="with --ablation: static methods of params.yaml run beside "
                        "(e.g. auto_s per_adapter: the anchor's two halves)")  # fmt: skip
    parser.add_argument("--public-episodes", type=int, default=0,
                        help="with --ablation: also RLDP warm-started from a policy trained on "
                        "this many runs on public data (models/rldp-public/policy.pt)")  # fmt: skip
    add_project_arguments(parser)
    args = parser.parse_args()
    params, root, data = open_project(args)
    rldp = args.rldp if args.rldp is not None else dict(params.method("rldp")[1])
    dpsgd = dict(params.method("dpsgd")[1]) if "dpsgd" in params.methods else {"clip": 1.0}
    name = "rldp_ablation" if args.ablation else "rldp_vs_dpsgd"
    name += "_quick" if args.quick else ""
    variants = {"DP-SGD": ("dpsgd", dpsgd)}
    if args.ablation:
        chosen = {key: ABLATION[key] for key in args.variants}
        variants |= {label: ("rldp", {**rldp, **extra}) for label, extra in chosen.values()}
        for entry in args.baselines:
            method, options = params.method(entry)
            variants[f"{entry} (static method)"] = (method, dict(options))
        if args.public_episodes:
            policy = public_policy(params, root, data, rldp, args)
            label = f"anchor + policy warm-started on public data ({args.public_episodes} runs)"
            variants[label] = ("rldp", {**rldp, "warm_start": str(policy)})
    else:
        variants["RLDP"] = ("rldp", rldp)
    earlier = io.read_json(args.reuse) if args.reuse else []
    earlier = earlier["runs"] if isinstance(earlier, dict) else earlier  # a JSON or its _runs
    source = source_version()
    runs = []
    for eps in args.epsilons:
        for seed in args.seeds:
            # interleaved, so the methods of a pair see the same machine load
            for label, (method, options) in variants.items():
                run = _reusable(
                    earlier, method, options, eps, seed, args.epochs,
                    source=source, any_source=args.reuse_any_source,
                )  # fmt: skip
                if run is not None and not same_source(run, source):
                    run = {**run, "reused_source": run.get("source")}  # None: not recorded
                    commit = (run["reused_source"] or {}).get("commit") or "unrecorded"
                    print(f"{label[:24]:>24} eps={eps:<4} seed={seed} reused: code {commit}")
                if run is None and args.reuse_only:
                    continue
                if run is None:
                    run, _ = run_method(
                        params, root, method, options, data, epsilon=eps, seed=seed,
                        epochs=args.epochs, downstream=not args.ablation,
                    )  # fmt: skip
                runs.append({**run, "variant": label})
                io.write_json(args.out / f"{name}_runs.json", runs)  # partial results
                print(
                    f"{label[:24]:>24} eps={eps:<4} seed={seed} "
                    f"ppl={run['test_perplexity']:.2f} spent={run['epsilon_spent']:.3f} "
                    f"{run['loop_seconds_per_step'] * 1e3:.0f} ms/step",
                    flush=True,
                )
    if args.ablation:
        table = ablation_markdown(runs, args.epsilons, args.seeds)
        io.write_json(args.out / f"{name}.json", {"epochs": args.epochs, "runs": runs})
        with io.atomic_file(args.out / f"{name}.md") as handle:
            handle.write(table)
        print(table)
        return
    rows = summarise(runs, args.epsilons, args.seeds)
    result = {
        "quick": args.quick,
        "profile": args.profile,
        "epochs": args.epochs,
        "rldp": rldp,
        "summary": {f"{row['epsilon']:g}": row["ppl_ratio_mean"] for row in rows},
        "rows": rows,
    }
    io.write_json(args.out / f"{name}.json", {**result, "runs": runs})
    plot(runs, rows, args.out / f"{name}.png")
    with io.atomic_file(args.out / f"{name}.md") as handle:
        handle.write(markdown(rows))
    print(markdown(rows))


def public_policy(params, root: Path, data, rldp: dict, args: argparse.Namespace) -> Path:
    """The policy trained on public data (privtune.rldp_public), trained once and reused."""
    from privtune.rldp_public import train_public_policy

    path = root / "models" / "rldp-public" / "policy.pt"
    if not path.is_file():
        epochs = args.epochs if args.epochs is not None else params.finetune.epochs
        print(f"training the RLDP policy on public data ({args.public_episodes} runs)", flush=True)
        train_public_policy(
            params, root, path, options=rldp, n_records=len(data.train),
            epsilon=max(args.epsilons), epochs=epochs, episodes=args.public_episodes,
        )  # fmt: skip
    return path


def _reusable(
    earlier: list[dict],
    method: str,
    options: dict,
    eps: float,
    seed: int,
    epochs: float | None,
    *,
    source: dict,
    any_source: bool = False,
) -> dict | None:
    """An earlier run of exactly this method, options (defaults filled in), epsilon, seed and
    length, of today's code (``source``: common.same_source); with ``any_source`` one of other
    code where none of today's is there. Runs that did not record their resolved options are
    never reused: a default that changed since would go unnoticed."""
    resolved = resolved_options(method, options)
    found = [
        run
        for run in earlier
        if (run["method"], run.get("resolved_options"), run["epsilon"], run["seed"])
        == (method, resolved, eps, seed)
        and run.get("epochs") == epochs
    ]
    today = [run for run in found if same_source(run, source)]
    return (today or (found if any_source else []) or [None])[0]


def ablation_markdown(runs: list[dict], epsilons, seeds) -> str:
    """Per variant: mean test perplexity and its mean ratio to DP-SGD's over the seeds."""
    lines = [
        "| ε | variant | test ppl (mean over seeds) | / DP-SGD (mean [min, max]) | "
        "policy actions / fallbacks to the anchor (sum) | step time / DP-SGD |",
        "|---|---|---|---|---|---|",
    ]
    for eps in epsilons:
        base = {r["seed"]: r for r in runs if r["method"] == "dpsgd" and r["epsilon"] == eps}
        labels = dict.fromkeys(r["variant"] for r in runs if r["epsilon"] == eps)
        for label in labels:
            rows = [
                r
                for r in runs
                if r["variant"] == label and r["epsilon"] == eps and r["seed"] in base
            ]
            ratios = [r["test_perplexity"] / base[r["seed"]]["test_perplexity"] for r in rows]
            times = [step_ratio(r, base[r["seed"]]) for r in rows]
            metrics = [r.get("controller_metrics") or {} for r in rows]
            acted = sum(m.get("rldp/policy_actions", 0) for m in metrics)
            fell = sum(m.get("rldp/anchor_fallbacks", 0) for m in metrics)
            lines.append(
                f"| {eps:g} | {label} | {statistics.mean(r['test_perplexity'] for r in rows):.2f}"
                f" | {statistics.mean(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}] | "
                f"{acted:.0f} / {fell:.0f} | {statistics.mean(times):.3f} |"
            )
    del seeds
    return "\n".join(lines + policy_effect(runs, epsilons)) + "\n"


def policy_effect(runs: list[dict], epsilons) -> list[str]:
    """Per seed, each variant with a policy minus the anchor alone, beside the test notes'
    noise: the policy's doing, the cost of the DP norm histogram it reads included (the anchor
    alone releases none; runs before afa5980 paid for it in both, sharing every draw until the
    policy first acted)."""
    anchor_label = ABLATION["anchor"][0]
    lines = []
    for eps in epsilons:
        anchors = {
            r["seed"]: r
            for r in runs
            if r["variant"] == anchor_label and r["epsilon"] == eps and "record_scores" in r
        }
        for r in runs:
            if not (r["variant"].startswith("anchor +") and r["epsilon"] == eps):
                continue
            if r["seed"] not in anchors or "record_scores" not in r:
                continue  # runs from before the per-note scores have none
            d = difference(r, anchors[r["seed"]], r["variant"], "anchor")
            acted = (r.get("controller_metrics") or {}).get("rldp/policy_actions", 0)
            lines.append(
                f"| {eps:g} | {r['variant']} | {r['seed']} | {acted:.0f} | "
                f"{r['test_perplexity']:.2f} | {anchors[r['seed']]['test_perplexity']:.2f} | "
                f"{d['difference']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] "
                f"({d['records']} notes) |"
            )
    if not lines:
        return []
    return [
        "",
        "| ε | variant | seed | policy actions | test ppl | anchor alone | variant − anchor "
        "alone [95 % paired interval over the test notes] |",
        "|---|---|---|---|---|---|---|",
        *lines,
    ]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| ε | test ppl RLDP / DP-SGD (mean [min, max]) | DP-SGD ppl | RLDP ppl | "
        "medication acc DP-SGD / RLDP | RLDP steps to DP-SGD's final valid loss | "
        "step time RLDP / DP-SGD (wall, CPU) | RLDP's decisions, share of its CPU | "
        "max ε spent |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reach = ", ".join("never" if s is None else str(s) for s in r["rldp_steps_to_dpsgd_final"])
        lines.append(
            f"| {r['epsilon']:g} ({len(r['seeds'])} seeds) | {r['ppl_ratio_mean']:.3f} "
            f"[{r['ppl_ratio_min']:.3f}, "
            f"{r['ppl_ratio_max']:.3f}] | {r['dpsgd_ppl']:.1f} | {r['rldp_ppl']:.1f} | "
            f"{r['dpsgd_med_acc']:.3f} / {r['rldp_med_acc']:.3f} | {reach} of "
            f"{r['dpsgd_steps']} | {r['step_time_ratio']:.3f}, "
            f"{r.get('step_cpu_ratio', math.nan):.3f} | "
            f"{100 * r.get('rldp_decision_cpu_share', math.nan):.1f} % | "
            f"{r['max_epsilon_spent']:.3f} |"
        )
    seeds = [(r["epsilon"], p) for r in rows for p in r.get("paired", [])]
    if seeds:  # runs from before the per-note scores have none
        lines += [
            "",
            "| ε | seed | DP-SGD ppl | RLDP ppl | RLDP − DP-SGD [95 % paired interval over "
            "the test notes] |",
            "|---|---|---|---|---|",
            *(
                f"| {eps:g} | {p['seed']} | {p['dpsgd_ppl']:.2f} | {p['rldp_ppl']:.2f} | "
                f"{p['difference']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}] "
                f"({p['records']} notes) |"
                for eps, p in seeds
            ),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
