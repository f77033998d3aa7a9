"""`make mutate-report` (scripts/mutation_report.py): counts per area, equivalents folded in,
and verdicts carried over from a previous report only for functions whose source is unchanged.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mutation_report.py"
spec = importlib.util.spec_from_file_location("mutation_report", SCRIPT)
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

GUARD = "privtune.privacy.guard"


def _meta(mutants: Path, codes: dict[str, int | None], hashes: dict[str, str]) -> None:
    """mutmut's per-file meta of src/privtune/privacy/guard.py."""
    meta = mutants / "src" / "privtune" / "privacy" / "guard.py.meta"
    meta.parent.mkdir(parents=True, exist_ok=True)
    keys = {f"{GUARD}.{name}": code for name, code in codes.items()}
    meta.write_text(json.dumps({"exit_code_by_key": keys, "hash_by_function_name": hashes}))


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "out"
    argv = ["--mutants", str(tmp_path / "mutants"), "--out", str(out), "--notes", "", *extra]
    argv += ["--run-notes", "", "--equivalents", str(tmp_path / "eq.yaml")]
    assert report.main(argv) == 0
    return json.loads((out / "mutation.json").read_text())


def test_verdicts_carry_over_only_for_unchanged_functions(tmp_path: Path) -> None:
    """Unrun mutants of an unchanged function take the previous verdict (an argued equivalent
    stays equivalent); those of a changed function stay unchecked; what ran keeps its own."""
    (tmp_path / "eq.yaml").write_text(yaml.safe_dump({f"{GUARD}.x_spent__mutmut_2": "why"}))
    codes = {
        "x_spent__mutmut_1": None,  # unchanged function, not run: carried (killed)
        "x_spent__mutmut_2": None,  # unchanged, not run, argued equivalent before: still so
        "x_admit__mutmut_1": None,  # changed function, not run: not checked
        "x_admit__mutmut_2": 0,  # ran here: survived, whatever the previous report said
    }
    _meta(tmp_path / "mutants", codes, {"x_spent": "aaa", "x_admit": "new"})
    previous = {
        "mutants": {
            f"{GUARD}.x_spent__mutmut_1": "killed",
            f"{GUARD}.x_spent__mutmut_2": "equivalent",
            f"{GUARD}.x_admit__mutmut_1": "killed",
            f"{GUARD}.x_admit__mutmut_2": "killed",
        },
        "function_hashes": {f"{GUARD}.x_spent": "aaa", f"{GUARD}.x_admit": "old"},
    }
    (tmp_path / "previous.json").write_text(json.dumps(previous))
    summary = _run(tmp_path, "--carry-over", str(tmp_path / "previous.json"))
    assert summary["mutants"] == {
        f"{GUARD}.x_admit__mutmut_1": "not checked",
        f"{GUARD}.x_admit__mutmut_2": "survived",
        f"{GUARD}.x_spent__mutmut_1": "killed",
        f"{GUARD}.x_spent__mutmut_2": "equivalent",
    }
    assert summary["carried_over"] == 2
    assert summary["function_hashes"] == {f"{GUARD}.x_admit": "new", f"{GUARD}.x_spent": "aaa"}
    assert summary["areas"]["privacy/"]["kill_rate"] == 0.5  # 1 killed, 1 survived, run
    assert "2 of the 4 verdicts were carried over" in (tmp_path / "out" / "mutation.md").read_text()


def test_without_carry_over_unrun_mutants_are_not_checked(tmp_path: Path) -> None:
    (tmp_path / "eq.yaml").write_text("{}")
    _meta(tmp_path / "mutants", {"x_spent__mutmut_1": None, "x_spent__mutmut_2": 1}, {})
    summary = _run(tmp_path)
    assert summary["carried_over"] == 0
    assert summary["areas"]["privacy/"] == {
        "not checked": 1, "killed": 1, "kill_rate": 1.0,
    }  # fmt: skip
