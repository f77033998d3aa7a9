"""The mutation report of `make mutate` (issue 21): mutmut's results in mutants/ as a table per
module and per area, with every survivor named.

    python scripts/mutation_report.py            # writes benchmarks/results/mutation.{md,json}

A mutant listed in benchmarks/mutation_equivalents.yaml (name: one-line argument that it cannot
change behaviour) is counted as equivalent, not as a survivor; a listed mutant the tests kill
is counted as killed (and the stale entry reported). The kill rate is over non-equivalent
mutants that were run: (killed + timeout) / (run - equivalent); a timeout is a mutant whose
tests never finished (an endless loop), so the suite did notice it. "no tests" mutants (no
selected test reaches their function) count as not killed.

    python scripts/mutation_report.py --carry-over benchmarks/results/mutation.json

after a pass that ran only some mutants (`mutmut run 'privtune.privacy.guard.*'`), takes each
mutant left unrun from the previous report, if its function's source is unchanged (mutmut's
hash of it, recorded in the report), and says how many verdicts it carried. A carried "killed"
assumes the tests that killed it are still there: after removing or weakening tests, run
every mutant again.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENTS = ROOT / "benchmarks" / "mutation_equivalents.yaml"
SCOPE = ROOT / "benchmarks" / "mutation_scope.md"  # which files and tests, and why
RUN_NOTES = ROOT / "benchmarks" / "mutation_run.md"  # what the committed run ran, and how long
OUT = ROOT / "benchmarks" / "results"

# mutmut 3's exit codes (mutmut.stats.status_by_exit_code), folded into the report's columns
STATUS = {
    1: "killed",
    3: "killed",
    37: "killed",  # caught by the type checker (not configured here)
    0: "survived",
    5: "no tests",
    33: "no tests",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
    255: "timeout",
    None: "not checked",
    2: "not checked",  # interrupted
    34: "skipped",
}
COLUMNS = ("killed", "timeout", "survived", "no tests", "equivalent", "not checked", "other")


def area(module: str) -> str:
    if module.startswith("privtune.privacy."):
        return "privacy/"
    if module == "privtune.registry.promotion":
        return "promotion gates"
    return "controller bounds"


def load_results(mutants: Path) -> dict[str, dict[str, Any]]:
    """mutant name -> {module, status, function, hash} from mutmut's per-file .meta files (the
    hash is mutmut's of the mutated function's source: equal hashes, same mutants)."""
    results: dict[str, dict[str, Any]] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        source = meta.relative_to(mutants).with_suffix("")  # src/privtune/x/y.py
        module = ".".join(source.with_suffix("").parts[1:])
        hashes = data.get("hash_by_function_name") or {}
        for name, code in data["exit_code_by_key"].items():
            function = name.rsplit("__mutmut_", 1)[0].removeprefix(module + ".")
            results[name] = {
                "module": module,
                "path": str(source),
                "function": function,
                "hash": hashes.get(function),
                "status": STATUS.get(code, "other"),
                "exit_code": code,
            }
    return results


def carry_over(results: dict[str, dict[str, Any]], previous: dict[str, Any]) -> int:
    """Give each mutant this pass did not run its verdict in the `previous` report, where its
    function's source hash is the one the previous report recorded. Returns how many."""
    verdicts = previous.get("mutants", {})
    hashes = previous.get("function_hashes", {})
    carried = 0
    for name, r in results.items():
        before = verdicts.get(name)
        key = f"{r['module']}.{r['function']}"
        if r["status"] != "not checked" or before in (None, "not checked"):
            continue
        if r["hash"] is None or hashes.get(key) != r["hash"]:
            continue  # the function changed (or its hash is unknown): its mutants may differ
        # "equivalent" was a survivor argued in the equivalents file, which summarise re-reads
        r["status"] = "survived" if before == "equivalent" else before
        r["carried"] = True
        carried += 1
    return carried


def sample(results: dict[str, dict[str, Any]], per_module: int, seed: int) -> list[str]:
    """A stratified random sample: ``per_module`` mutants of each module (all, if fewer), for a
    run that cannot test every mutant (`mutmut run $(... --sample N)`)."""
    import random

    by_module: dict[str, list[str]] = defaultdict(list)
    for name, r in sorted(results.items()):
        by_module[r["module"]].append(name)
    rng = random.Random(seed)
    chosen: list[str] = []
    for module in sorted(by_module):
        names = by_module[module]
        chosen += sorted(rng.sample(names, min(per_module, len(names))))
    return chosen


def mutated_lines(name: str, path: str) -> str:
    """The mutant's change as `- old` / `+ new` (the lines that differ), from mutmut's copy."""
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        diff = get_diff_for_mutant(name, path=path)
    except Exception as err:  # a report without diffs is still a report
        return f"(no diff: {type(err).__name__})"
    changed = [
        line
        for line in diff.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    return " / ".join(f"{line[0]} {line[1:].strip()}" for line in changed)


def summarise(
    results: dict[str, dict[str, Any]], equivalents: dict[str, str]
) -> tuple[dict[str, Counter], dict[str, Counter], list[str]]:
    per_module: dict[str, Counter] = defaultdict(Counter)
    per_area: dict[str, Counter] = defaultdict(Counter)
    stale = []
    for name, r in results.items():
        status = r["status"]
        if name in equivalents:
            if status in ("killed", "timeout"):
                stale.append(name)
            elif status != "not checked":
                status = "equivalent"
        r["reported"] = status
        column = status if status in COLUMNS else "other"
        per_module[r["module"]][column] += 1
        per_area[area(r["module"])][column] += 1
    stale += [name for name in equivalents if name not in results]
    return per_module, per_area, stale


def kill_rate(counts: Counter) -> float | None:
    run = sum(counts.values()) - counts["not checked"] - counts["equivalent"]
    return (counts["killed"] + counts["timeout"]) / run if run else None


def _row(label: str, counts: Counter) -> str:
    rate = kill_rate(counts)
    cells = [str(counts[c]) for c in COLUMNS]
    shown = "–" if rate is None else f"{100 * rate:.1f} %"
    return f"| {label} | {sum(counts.values())} | " + " | ".join(cells) + f" | {shown} |"


def render(
    results: dict[str, dict[str, Any]],
    equivalents: dict[str, str],
    per_module: dict[str, Counter],
    per_area: dict[str, Counter],
    stale: list[str],
    notes: str,
    carried: int = 0,
) -> str:
    header = (
        "| | mutants | " + " | ".join(COLUMNS) + " | kill rate |\n"
        "|---|---:|" + "---:|" * len(COLUMNS) + "---:|"
    )
    lines = [
        "# Mutation testing: the privacy core, the promotion gates, the controllers' bounds",
        "",
        "Generated by `make mutate` (mutmut 3, `[tool.mutmut]` in pyproject.toml) and "
        "`scripts/mutation_report.py`; equivalent mutants are argued in "
        "`benchmarks/mutation_equivalents.yaml`. Kill rate: (killed + timeout) / (run − "
        "equivalent); `no tests` counts as not killed, `not checked` (not run) is left out.",
        "",
    ]
    if notes:
        lines += [notes.strip(), ""]
    if carried:
        lines += [
            f"{carried} of the {len(results)} verdicts were carried over from the previous "
            "report: mutants this pass did not run, of functions whose source is unchanged "
            "(the same mutmut hash).",
            "",
        ]
    lines += ["## By area", "", header]
    lines += [_row(a, per_area[a]) for a in sorted(per_area)]
    total: Counter = Counter()
    for counts in per_area.values():
        total.update(counts)
    lines += [_row("**all**", total), "", "## By module", "", header]
    lines += [_row(f"`{m}`", per_module[m]) for m in sorted(per_module)]
    survivors = sorted(
        (n for n, r in results.items() if r["reported"] in ("survived", "no tests", "other")),
        key=lambda n: (results[n]["module"], n),
    )
    lines += ["", f"## Survivors ({len(survivors)}): not killed, not argued equivalent", ""]
    if survivors:
        lines += ["| mutant | status | change |", "|---|---|---|"]
        for name in survivors:
            r = results[name]
            change = mutated_lines(name, r["path"]).replace("|", "\\|")
            lines.append(f"| `{name}` | {r['reported']} | `{change}` |")
    else:
        lines.append("None.")
    equivalent = sorted(n for n, r in results.items() if r["reported"] == "equivalent")
    lines += ["", f"## Equivalent mutants ({len(equivalent)})", ""]
    if equivalent:
        lines += ["| mutant | change | why it cannot change behaviour |", "|---|---|---|"]
        for name in equivalent:
            change = mutated_lines(name, results[name]["path"]).replace("|", "\\|")
            why = equivalents[name].replace("|", "\\|")
            lines.append(f"| `{name}` | `{change}` | {why} |")
    if stale:
        lines += ["", "## Stale equivalence entries (killed, or no such mutant)", ""]
        lines += [f"- `{name}`" for name in sorted(stale)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=ROOT / "mutants")
    parser.add_argument("--equivalents", type=Path, default=EQUIVALENTS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--notes", type=Path, default=SCOPE, help="markdown under the title")
    parser.add_argument("--sample", type=int, help="print N mutant names per module and exit")
    parser.add_argument("--seed", type=int, default=0, help="of --sample")
    parser.add_argument(
        "--run-notes", type=Path, default=RUN_NOTES, help="markdown about this run (after --notes)"
    )
    parser.add_argument(
        "--carry-over",
        type=Path,
        help="a previous mutation.json: verdicts for mutants not run here, functions unchanged",
    )
    args = parser.parse_args(argv)
    if not args.mutants.is_dir():
        print(f"no {args.mutants}: run `make mutate` first", file=sys.stderr)
        return 2
    equivalents = yaml.safe_load(args.equivalents.read_text()) if args.equivalents.is_file() else {}
    equivalents = {str(k): str(v) for k, v in (equivalents or {}).items()}
    results = load_results(args.mutants)
    if args.sample:
        print(" ".join(sample(results, args.sample, args.seed)))
        return 0
    carried = 0
    if args.carry_over:
        carried = carry_over(results, json.loads(args.carry_over.read_text()))
    per_module, per_area, stale = summarise(results, equivalents)
    notes = "\n\n".join(
        path.read_text().strip() for path in (args.notes, args.run_notes) if path and path.is_file()
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mutation.md").write_text(
        render(results, equivalents, per_module, per_area, stale, notes, carried)
    )
    summary = {
        "areas": {a: dict(c) | {"kill_rate": kill_rate(c)} for a, c in sorted(per_area.items())},
        "modules": {
            m: dict(c) | {"kill_rate": kill_rate(c)} for m, c in sorted(per_module.items())
        },
        "mutants": {n: r["reported"] for n, r in sorted(results.items())},
        "stale_equivalents": sorted(stale),
        "carried_over": carried,
        # mutmut's hash of each mutated function's source, for a later --carry-over
        "function_hashes": {
            f"{r['module']}.{r['function']}": r["hash"]
            for _, r in sorted(results.items())
            if r["hash"] is not None
        },
    }
    (args.out / "mutation.json").write_text(json.dumps(summary, indent=1) + "\n")
    for a, c in sorted(per_area.items()):
        rate = kill_rate(c)
        print(f"{a}: {'–' if rate is None else f'{100 * rate:.1f} %'} killed ({dict(c)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
