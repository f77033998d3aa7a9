"""The report puts every method's numbers side by side, plots them, and logs once to MLflow."""

from __future__ import annotations

import mlflow
import pytest

from privtune import io
from privtune.config import Params
from privtune.stages.report import REPORT_DIR, markdown_table, report


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    for name, eps, ppl, auc in [("nonprivate", None, 240.0, 0.71), ("dpsgd", 7.99, 430.0, 0.52)]:
        finetune = {"method": name, "steps": 180, "delta": 5e-5}
        if eps is not None:
            finetune |= {"epsilon": eps, "target_epsilon": 8.0}
        io.write_json(tmp_path / f"metrics/finetune-{name}.json", finetune)
        io.write_json(
            tmp_path / f"metrics/evaluate-{name}.json",
            {"method": name, "test_perplexity": ppl, "medication_accuracy": 0.05},
        )
        io.write_json(
            tmp_path / f"metrics/attack-{name}.json",
            {"method": name, "mia_auc_max": auc, "audit_epsilon_lower_bound": 0.4},
        )
        rows = "step,loss,valid_loss,epsilon\n0,8.0,8.1,0.1\n10,7.0,,0.2\n20,6.0,6.2,0.3\n"
        (tmp_path / "plots").mkdir(exist_ok=True)
        (tmp_path / f"plots/finetune-{name}.csv").write_text(rows)
    return tmp_path


def test_report_table_plots_and_one_mlflow_run(project):
    params = Params.model_validate(
        {"methods": {"nonprivate": {}, "dpsgd": {"clip": 1.0}, "rldp": {}}}
    )
    result = report(params, project)
    assert result["methods"] == ["nonprivate", "dpsgd", "rldp"]
    text = (project / REPORT_DIR / "report.md").read_text()
    dpsgd = next(line for line in text.splitlines() if line.startswith("| dpsgd |"))
    assert "| 7.990 |" in dpsgd and "| 430.0 |" in dpsgd and "| 0.520 |" in dpsgd
    nonprivate = next(line for line in text.splitlines() if line.startswith("| nonprivate |"))
    assert "| ∞ |" in nonprivate
    # a method that has not run yet shows dashes, never made-up numbers
    rldp = next(line for line in text.splitlines() if line.startswith("| rldp |"))
    assert set(rldp.strip("| ").split(" | ")[1:]) == {"–"}
    for figure in ["utility_vs_epsilon.png", "valid_perplexity.png", "utility_vs_attack.png"]:
        assert (project / REPORT_DIR / figure).stat().st_size > 1000
    saved = io.read_json(project / REPORT_DIR / "report.json")
    assert saved["dpsgd"]["attack"]["mia_auc_max"] == 0.52

    report(params, project)  # same content: no second run
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    assert runs[0].data.tags["stage"] == "report"  # the same tag key as fine-tuning runs
    artifacts = {
        a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "report")
    }
    assert "report/report.md" in artifacts and "report/utility_vs_attack.png" in artifacts


def test_table_has_a_row_per_method_and_a_column_per_number():
    rows = {"a": {"finetune": {}, "evaluate": {"test_perplexity": 3.0}, "attack": {}}}
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[2].count("|")


def _record_scores(root, name: str, nll: list[float], evaluated_on: str = "split-1") -> None:
    parts = {"numerators": [n * 10 for n in nll], "denominators": [10.0] * len(nll)}
    io.write_json(
        root / f"metrics/record-scores-{name}.json",
        {
            "evaluated_on": evaluated_on,
            "scores": {"test_perplexity": parts | {"exponentiate": True}},
        },
    )


def test_methods_are_compared_with_dpsgd_note_by_note(project):
    """A method better than DP-SGD on every test note by a little is lower beyond the noise;
    one that is better on some notes and worse on others is within it; one scored on other
    notes is not paired at all."""
    import math

    notes = [4.0 + 0.5 * (i % 7) for i in range(60)]  # notes of unequal difficulty
    _record_scores(project, "dpsgd", notes)
    _record_scores(project, "nonprivate", [n - 0.02 for n in notes])
    _record_scores(project, "rldp", [n + (0.3 if i % 2 else -0.3) for i, n in enumerate(notes)])
    _record_scores(project, "lmo", notes, evaluated_on="split-2")
    params = Params.model_validate(
        {"methods": {"nonprivate": {}, "dpsgd": {"clip": 1.0}, "rldp": {}, "lmo": {"clip": 1.0}}}
    )
    report(params, project)
    text = (project / REPORT_DIR / "report.md").read_text()
    saved = io.read_json(project / REPORT_DIR / "report.json")
    assert set(k for k in saved if "vs_dpsgd" in saved[k]) == {"nonprivate", "rldp"}
    reference = math.exp(sum(notes) / len(notes))
    lower = saved["nonprivate"]["vs_dpsgd"]
    assert lower["difference"] == pytest.approx(math.exp(sum(notes) / 60 - 0.02) - reference)
    assert lower["high"] < 0 and lower["records"] == 60
    line = next(x for x in text.splitlines() if x.startswith("| nonprivate | -"))
    assert line.endswith("| lower beyond the noise |") and "over 60 notes" in line
    mixed = saved["rldp"]["vs_dpsgd"]
    assert mixed["low"] < 0 < mixed["high"]
    assert "| within the noise |" in next(
        x for x in text.splitlines() if x.startswith("| rldp | +")
    )
    assert not any(
        x.startswith("| lmo | +") or x.startswith("| lmo | -") for x in text.splitlines()
    )


def test_without_per_record_scores_the_report_has_no_paired_section(project):
    params = Params.model_validate({"methods": {"nonprivate": {}, "dpsgd": {"clip": 1.0}}})
    report(params, project)
    assert "note by note" not in (project / REPORT_DIR / "report.md").read_text()


def test_the_summary_says_what_a_note_of_downstream_accuracy_is(project):
    """`privtune summary` on a small test split: a note's share and the standard error under
    the table (13 notes: accuracy moves by 0.077 a note), not in the markdown README carries."""
    from privtune.stages.report import summary_table

    params = Params.model_validate({"methods": {"nonprivate": {}, "dpsgd": {"clip": 1.0}}})
    for name in ("nonprivate", "dpsgd"):
        path = project / f"metrics/evaluate-{name}.json"
        io.write_json(path, io.read_json(path) | {"downstream_records": 13.0})
    last = summary_table(params, project).splitlines()[-1]
    assert last.startswith("(downstream accuracy on 13 test notes: one note is 0.077")
    assert "standard error up to 0.139" in last
    assert "test notes" not in summary_table(params, project, markdown=True)
