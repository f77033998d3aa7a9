"""The promotion gates as pure functions, against decisions computed by hand.

The registry tests exercise the gates through MLflow with the default gates only; here every
utility gate is drawn with a tolerance and a direction and checked against the rule as a
privacy officer would state it (lower is better: at most the champion's value plus the
tolerance; higher is better: at least the champion's minus it), at its boundary, and on
values no gate may pass (NaN, infinities).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.registry import Gates, evaluate_gates

SAFE = {
    "secret_noise": "true",
    "epsilon": "4.0",
    "delta": "1e-05",
    "attack.mia_auc_max": "0.52",
    "attack.mia_auc_ci_low_max": "0.44",
    "attack.mia_tpr_at_fpr_0.01_max": "0.012",
    "attack.mia_tpr_at_fpr_0.01_ci_low_max": "0.0",
    "attack.audit_epsilon_lower_bound": "0.5",
}


class Champion:
    version = "1"

    def __init__(self, value: float, metric: str = "test_perplexity") -> None:
        self.tags = {f"utility.{metric}": repr(value)}


POINT = {"utility_confidence": None}  # gates judging the two numbers alone, without an interval


def _utility(gates: Gates, challenger: float, champion: float) -> bool:
    tags = SAFE | {f"utility.{gates.utility_metric}": repr(challenger)}
    results = {
        g.gate: g for g in evaluate_gates(gates, tags, Champion(champion, gates.utility_metric))
    }
    assert all(g.passed for name, g in results.items() if name != "utility")
    return results["utility"].passed


@settings(max_examples=60, deadline=None)
@given(
    challenger=st.floats(0.0, 100.0),
    champion=st.floats(0.0, 100.0),
    tolerance=st.floats(0.0, 10.0),
    higher_is_better=st.booleans(),
)
def test_utility_gate_matches_the_rule_with_tolerance_and_direction(
    challenger, champion, tolerance, higher_is_better
):
    gates = Gates(
        utility_metric="medication_accuracy" if higher_is_better else "test_perplexity",
        higher_is_better=higher_is_better,
        utility_tolerance=tolerance,
        utility_confidence=None,  # the two numbers alone
    )
    if higher_is_better:
        expected = challenger >= champion - tolerance
    else:
        expected = challenger <= champion + tolerance
    # the rule and the gate may round differently only within an ulp of the boundary
    if abs((challenger - champion) + (tolerance if higher_is_better else -tolerance)) > 1e-9:
        assert _utility(gates, challenger, champion) == expected


@pytest.mark.parametrize(
    ("higher_is_better", "challenger", "champion", "tolerance", "passed"),
    [
        (False, 42.5, 40.0, 2.5, True),  # worse by exactly the tolerance: allowed
        (False, 42.75, 40.0, 2.5, False),  # worse by more: refused
        (False, 37.0, 40.0, 0.0, True),  # better
        (False, 40.0, 40.0, 0.0, True),  # equal, no tolerance
        (False, 40.25, 40.0, 0.0, False),
        (True, 0.25, 0.5, 0.25, True),  # accuracy lower by exactly the tolerance
        (True, 0.125, 0.5, 0.25, False),
        (True, 0.75, 0.5, 0.0, True),
        (True, 0.25, 0.5, 0.0, False),
    ],
)
def test_utility_gate_boundaries(higher_is_better, challenger, champion, tolerance, passed):
    gates = Gates(
        utility_metric="medication_accuracy" if higher_is_better else "test_perplexity",
        higher_is_better=higher_is_better,
        utility_tolerance=tolerance,
        utility_confidence=None,  # the two numbers alone
    )
    assert _utility(gates, challenger, champion) is passed


@pytest.mark.parametrize("higher_is_better", [False, True])
@pytest.mark.parametrize(
    ("challenger", "champion"), [(math.nan, 40.0), (40.0, math.nan), (math.nan, math.nan)]
)
def test_utility_gate_refuses_nan(higher_is_better, challenger, champion):
    gates = Gates(higher_is_better=higher_is_better, utility_tolerance=1.0, utility_confidence=None)
    assert _utility(gates, challenger, champion) is False


def test_utility_gate_on_infinities():
    lower = Gates(utility_confidence=None)  # perplexity: lower is better
    assert _utility(lower, math.inf, 40.0) is False  # a diverged model never wins
    assert _utility(lower, 40.0, math.inf) is True
    higher = Gates(utility_metric="medication_accuracy", higher_is_better=True, **POINT)
    assert _utility(higher, -math.inf, 0.5) is False
    assert _utility(higher, math.inf, 0.5) is True


@pytest.mark.parametrize(
    ("key", "value", "gate", "passed"),
    [
        ("epsilon", "8.0", "epsilon", True),  # at the limit: allowed
        ("epsilon", "8.000001", "epsilon", False),
        ("epsilon", "inf", "epsilon", False),  # not private
        ("epsilon", "nan", "epsilon", False),
        ("delta", "1e-4", "delta", True),
        ("delta", "nan", "delta", False),
        ("attack.mia_auc_ci_low_max", "0.6", "mia_auc", True),  # bound at the threshold
        ("attack.mia_auc_ci_low_max", "0.600001", "mia_auc", False),
        ("attack.mia_auc_ci_low_max", "nan", "mia_auc", False),
        ("attack.mia_auc_max", "nan", "mia_auc", False),
        ("attack.mia_tpr_at_fpr_0.01_ci_low_max", "nan", "mia_tpr_at_fpr_0.01", False),
        ("attack.audit_epsilon_lower_bound", "4.0", "audit", True),  # audit = claimed epsilon
        ("attack.audit_epsilon_lower_bound", "4.0001", "audit", False),
        ("attack.audit_epsilon_lower_bound", "nan", "audit", False),
    ],
)
def test_contract_and_attack_gates_at_their_boundaries(key, value, gate, passed):
    """Equality passes (the gates are "at most"); just above, NaN or infinity never passes:
    a NaN attack score (an attack that produced no number) is no evidence of safety."""
    tags = SAFE | {key: value, "utility.test_perplexity": "40.0"}
    results = {g.gate: g for g in evaluate_gates(Gates(), tags, None)}
    assert results[gate].passed is passed
    # a claimed epsilon of NaN is also no threshold for the audit gate
    others = {gate, "audit"} if key == "epsilon" else {gate}
    assert all(g.passed for name, g in results.items() if name not in others)


class _Version:
    def __init__(self, version: str) -> None:
        self.version, self.tags = version, {"method": "dpsgd", "secret_noise": "true"}
        self.description = f"v{version}: PROMOTED to champion (gate table below)"


class _Model:
    def __init__(self) -> None:
        self.tags: dict[str, str] = {}


class FakeRegistry:
    """The few MlflowClient calls rollback makes, in memory (a missing alias raises as MLflow
    does): rollback's alias bookkeeping without a sqlite store."""

    def __init__(self, versions: list[str], history: list[str]) -> None:
        from privtune.registry.promotion import HISTORY_TAG, PREVIOUS

        self.versions = {v: _Version(v) for v in versions}
        self.model = _Model()
        self.model.tags[HISTORY_TAG] = json.dumps(history)
        self.aliases = {"champion": history[-1]}
        if len(history) >= 2:
            self.aliases[PREVIOUS] = history[-2]

    def _model(self, name):  # a call naming any other model fails, as MLflow's does
        from mlflow.exceptions import MlflowException

        if name != "m":
            raise MlflowException(f"no registered model {name!r}")

    def get_registered_model(self, name):
        self._model(name)
        return self.model

    def set_registered_model_tag(self, name, key, value):
        self._model(name)
        self.model.tags[key] = value

    def set_registered_model_alias(self, name, alias, version):
        self._model(name)
        self.aliases[alias] = str(version)

    def delete_registered_model_alias(self, name, alias):
        self._model(name)
        del self.aliases[alias]

    def get_model_version_by_alias(self, name, alias):
        from mlflow.exceptions import MlflowException

        self._model(name)
        if alias not in self.aliases:
            raise MlflowException(f"no alias {alias}")
        return self.versions[self.aliases[alias]]

    def get_model_version(self, name, version):
        self._model(name)
        return self.versions[str(version)]

    def set_model_version_tag(self, name, version, key, value):
        self._model(name)
        self.versions[str(version)].tags[key] = value

    def update_model_version(self, name, version, description):
        self._model(name)
        self.versions[str(version)].description = description

    def search_model_versions(self, query):
        return list(self.versions.values()) if query == "name = 'm'" else []

    def update_registered_model(self, name, description):
        self._model(name)
        self.model.description = description


def test_rollback_through_three_champions_moves_previous_champion_too(monkeypatch, tmp_path):
    """Champions 1, 2, 3: each rollback hands `champion` back one step and `previous_champion`
    with it (never left naming the version now champion), then removes it at the first."""
    from privtune.registry import promotion

    monkeypatch.chdir(tmp_path)  # the default store's promotion lock sits beside mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    fake = FakeRegistry(["1", "2", "3"], ["1", "2", "3"])
    # v3 was rolled back once before (then promoted by hand): its line is replaced, not stacked
    fake.versions["3"].description = "**ROLLED BACK** earlier\n\nv3: PROMOTED to champion"
    roots = []
    monkeypatch.setattr(promotion, "client", lambda root: roots.append(str(root)) or fake)
    back = promotion.rollback("m")
    assert (back.from_version, back.to_version) == ("3", "2")
    assert fake.aliases == {"champion": "2", promotion.PREVIOUS: "1"}
    back = promotion.rollback("m")
    assert (back.from_version, back.to_version) == ("2", "1")
    assert fake.aliases == {"champion": "1"}
    assert json.loads(fake.model.tags[promotion.HISTORY_TAG]) == ["1"]
    assert back.name == "m"
    rolled_back = datetime.fromisoformat(fake.versions["3"].tags["promotion.rolled_back"])
    assert rolled_back.utcoffset() == timedelta(0)  # UTC, as every promotion time is
    for version, to in (("3", "2"), ("2", "1")):  # each demoted page says so, once
        page = fake.versions[version].description
        assert page.startswith("**ROLLED BACK**") and page.count("ROLLED BACK") == 1
        assert f"given back to v{to}" in page and f"\n\nv{version}: PROMOTED to champion" in page
    assert not fake.versions["1"].description.startswith("**ROLLED BACK**")
    with pytest.raises(promotion.ModelError, match=r"no previous champion .*no champion came "):
        promotion.rollback("m")
    assert set(roots) == {"."}  # the current directory's store unless told
    fake = FakeRegistry(["1", "2"], ["1", "2"])
    assert promotion.rollback("m", root="elsewhere").to_version == "1"
    assert roots[-1] == "elsewhere"


def _gates(tags: dict[str, str], champion: Champion | None = None, **gates: object) -> dict:
    return {g.gate: g for g in evaluate_gates(Gates(**gates), tags, champion)}


@pytest.mark.parametrize(
    ("value", "low", "passed", "evidence", "margin"),
    [
        (0.55, 0.45, True, "within", 0.15),  # the value itself is within 0.6
        (0.6, 0.5, True, "within", 0.1),  # at the threshold
        (0.7, 0.5, True, "inconclusive", 0.1),  # above, but only within sampling noise
        (0.7, 0.6, True, "inconclusive", 0.0),  # the bound at the threshold
        (0.75, 0.625, False, "exceeds", -0.025),  # the bound beats the gate
    ],
)
def test_attack_gate_decides_on_the_lower_bound(value, low, passed, evidence, margin):
    tags = SAFE | {"attack.mia_auc_max": repr(value), "attack.mia_auc_ci_low_max": repr(low)}
    gate = _gates(tags)["mia_auc"]
    assert (gate.passed, gate.evidence) == (passed, evidence)
    assert (gate.value, gate.threshold) == (value, 0.6)
    assert gate.margin == pytest.approx(margin, abs=1e-12)
    assert f"lower confidence bound {low:.6g}" in gate.reason


def test_attack_gates_without_evidence_are_refused_and_say_what_to_do():
    no_attack = {k: v for k, v in SAFE.items() if not k.startswith("attack.mia")}
    gates = _gates(no_attack)
    for name in ("mia_auc", "mia_tpr_at_fpr_0.01"):
        g = gates[name]
        assert (g.passed, g.evidence, g.margin, g.value) == (
            False,
            "insufficient evidence",
            None,
            None,
        )
    assert gates["mia_auc"].reason == (
        "insufficient evidence: the best MIA AUC or its confidence bound missing (run the "
        "attack stage (attack results recorded before bounds: rerun it))"
    )
    assert gates["mia_tpr_at_fpr_0.01"].reason == (
        "insufficient evidence: the best TPR at 1 % FPR or its confidence bound missing "
        "(run the attack stage)"
    )
    assert gates["mia_tpr_at_fpr_0.01"].threshold == 0.05
    # attacked, but too few non-members to resolve a 1 % FPR: the fix names attack.members
    no_tpr_bound = {k: v for k, v in SAFE.items() if k != "attack.mia_tpr_at_fpr_0.01_ci_low_max"}
    tpr = _gates(no_tpr_bound)["mia_tpr_at_fpr_0.01"]
    assert not tpr.passed and tpr.evidence == "insufficient evidence"
    assert (tpr.value, tpr.threshold) == (0.012, 0.05)  # the value is kept for the record
    assert tpr.reason == (
        "insufficient evidence: the best TPR at 1 % FPR or its confidence bound missing (the "
        "attack's non-members cannot resolve a 1 % FPR: it needs at least 100, so raise "
        "attack.members to 100 or more (the model card has the counts))"
    )
    assert _gates(no_tpr_bound)["mia_auc"].passed


def test_tpr_gate_reads_its_own_threshold_and_bound():
    tags = SAFE | {
        "attack.mia_tpr_at_fpr_0.01_max": "0.2",
        "attack.mia_tpr_at_fpr_0.01_ci_low_max": "0.0625",
    }
    gate = _gates(tags, max_mia_tpr_at_fpr_0_01=0.0625)["mia_tpr_at_fpr_0.01"]
    assert (gate.passed, gate.evidence, gate.margin) == (True, "inconclusive", 0.0)
    gate = _gates(tags, max_mia_tpr_at_fpr_0_01=0.0624)["mia_tpr_at_fpr_0.01"]
    assert (gate.passed, gate.evidence) == (False, "exceeds")


def test_contract_gates_report_their_margin_and_what_is_missing():
    gates = _gates(SAFE | {"epsilon": "6.5", "utility.test_perplexity": "40.0"}, max_epsilon=8.0)
    eps = gates["epsilon"]
    assert (eps.passed, eps.value, eps.threshold, eps.margin) == (True, 6.5, 8.0, 1.5)
    assert eps.reason == "6.5 <= 8 (margin +1.5)"
    over = _gates(SAFE | {"epsilon": "9"}, max_epsilon=8.0)["epsilon"]
    assert (over.passed, over.margin, over.reason) == (False, -1.0, "9 > 8 (margin -1)")
    audit = gates["audit"]  # the audit's bound against the claimed epsilon
    assert (audit.value, audit.threshold, audit.margin) == (0.5, 6.5, 6.0)
    no_eps = _gates({k: v for k, v in SAFE.items() if k != "epsilon"})
    assert no_eps["epsilon"].reason == "spent epsilon missing: cannot check"
    assert no_eps["audit"].reason == "threshold for audit missing: cannot check"
    assert (no_eps["epsilon"].passed, no_eps["epsilon"].margin) == (False, None)
    assert (no_eps["epsilon"].value, no_eps["epsilon"].threshold) == (None, 8.0)
    assert (no_eps["audit"].passed, no_eps["audit"].value, no_eps["audit"].threshold) == (
        False,
        0.5,
        None,
    )
    no_audit = _gates({k: v for k, v in SAFE.items() if k != "attack.audit_epsilon_lower_bound"})
    assert no_audit["audit"].reason == ("attack.audit_epsilon_lower_bound missing: cannot check")
    assert _gates(SAFE | {"delta": "1e-5x"})["delta"].reason == "delta missing: cannot check"


def test_utility_gate_against_no_champion_or_one_without_the_metric():
    tags = SAFE | {"utility.test_perplexity": "40.0"}
    first = _gates(tags)["utility"]
    assert first.passed and first.threshold is None and "no champion yet" in first.reason
    assert first.reason.startswith("test_perplexity ")  # the number says what it measures
    assert first.value == 40.0  # the challenger's value is on record even with nothing to beat
    missing = _gates(SAFE)["utility"]
    assert not missing.passed and missing.reason == (
        "utility.test_perplexity missing: cannot check"
    )
    champion = Champion(40.0, metric="medication_accuracy")  # a champion judged on another one
    other = _gates(tags, champion)["utility"]
    assert not other.passed and other.threshold is None and other.value == 40.0
    assert other.reason == "champion v1 has no utility.test_perplexity: cannot compare"


@pytest.mark.parametrize("higher_is_better", [False, True])
def test_utility_margin_is_the_gain_plus_the_tolerance(higher_is_better):
    metric = "medication_accuracy" if higher_is_better else "test_perplexity"
    tags = SAFE | {f"utility.{metric}": "0.5"}
    gate = _gates(
        tags,
        Champion(0.75, metric),
        utility_metric=metric,
        higher_is_better=higher_is_better,
        utility_tolerance=0.125,
        **POINT,
    )["utility"]
    # higher is better: 0.5 - 0.75 + 0.125 < 0, refused; lower: 0.75 - 0.5 + 0.125, passed
    assert gate.margin == (-0.125 if higher_is_better else 0.375)
    assert gate.passed is (not higher_is_better)
    assert (gate.value, gate.threshold) == (0.5, 0.75)
    direction = "higher" if higher_is_better else "lower"
    assert f"({direction} is better; margin {gate.margin:+.6g})" in gate.reason


def test_utility_measured_on_other_test_data_is_not_compared():
    """A retrain on changed data: a better-looking number on other records is no evidence."""
    tags = SAFE | {"utility.test_perplexity": "30.0", "evaluated_on": "new"}
    champion = Champion(40.0)
    champion.tags["evaluated_on"] = "old"
    gate = _gates(tags, champion)["utility"]
    assert not gate.passed and gate.margin is None and (gate.value, gate.threshold) == (30, 40)
    assert gate.reason.startswith("not comparable: test_perplexity 30 and champion v1's 40")
    assert "evaluated_on new vs old" in gate.reason
    assert "registry.gates.utility_across_data: true" in gate.reason
    # a reviewer's decision to compare anyway; the same data, or a champion from before the
    # tag (unknown), is compared as always
    assert _gates(tags, champion, utility_across_data=True)["utility"].passed
    del champion.tags["evaluated_on"]
    assert _gates(tags, champion)["utility"].passed
    # the same data: judged on the interval, which this version does not have yet
    champion.tags["evaluated_on"] = "new"
    assert not _gates(tags, champion)["utility"].passed
    assert _gates(tags, champion, **POINT)["utility"].passed


def test_utility_on_other_data_is_compared_on_the_side_by_side_measurement():
    """After a retrain on changed data the gate compares the numbers promotion measured for
    both models on the same records (registry/paired.py), only for this champion, data and
    metric; a measurement that failed, or the option off, leaves them not comparable."""
    from privtune.registry.paired import PAIRED_TAG, Paired
    from privtune.registry.promotion import UNMEASURED

    champion = Champion(40.0)
    champion.tags["evaluated_on"] = "old"
    measured = Paired("1", "new", "test_perplexity", 41.5, 41.0, records=90, excluded=14)
    tags = SAFE | {"utility.test_perplexity": "30.0", "evaluated_on": "new"}
    gate = _gates(tags | {PAIRED_TAG: measured.to_tag()}, champion, **POINT)["utility"]
    # 30 against 40 as registered would pass; side by side the challenger is 0.5 worse
    assert not gate.passed and (gate.value, gate.threshold, gate.margin) == (41.5, 41.0, -0.5)
    assert "side by side on the 90 test records" in gate.reason
    assert "(14 it trained or validated on left out)" in gate.reason
    tolerant = _gates(
        tags | {PAIRED_TAG: measured.to_tag()}, champion, utility_tolerance=0.5, **POINT
    )
    assert tolerant["utility"].passed and tolerant["utility"].margin == 0

    for stale in (
        Paired("2", "new", "test_perplexity", 1.0, 2.0),  # against another champion
        Paired("1", "newer", "test_perplexity", 1.0, 2.0),  # of other test data
        Paired("1", "new", "medication_accuracy", 1.0, 2.0),  # of another metric
    ):
        gate = _gates(tags | {PAIRED_TAG: stale.to_tag()}, champion, **POINT)["utility"]
        assert not gate.passed and gate.reason.startswith("not comparable")
        assert "not compared on the same records" in gate.reason
    failed = Paired("1", "new", "test_perplexity", error="its train split is not cached")
    gate = _gates(tags | {PAIRED_TAG: failed.to_tag()}, champion, **POINT)["utility"]
    assert not gate.passed and gate.margin is None
    assert "comparing both on the same records failed: its train split is not cached" in gate.reason
    assert gate.evidence is None  # as things stand it cannot be compared: refused for good
    raised = replace(failed, error="measuring failed: MemoryError", transient=True)
    gate = _gates(tags | {PAIRED_TAG: raised.to_tag()}, champion, **POINT)["utility"]
    assert not gate.passed and gate.evidence == UNMEASURED  # judged again by the next run
    assert "failed (measuring failed: MemoryError); the next `privtune promote`" in gate.reason
    assert "utility_across_data" not in gate.reason  # not the data's fault
    off = _gates(
        tags | {PAIRED_TAG: measured.to_tag()}, champion, reevaluate_champion=False, **POINT
    )
    assert not off["utility"].passed
    assert "registry.gates.reevaluate_champion is off" in off["utility"].reason
    unreadable = _gates(tags | {PAIRED_TAG: "{not json"}, champion, **POINT)["utility"]
    assert not unreadable.passed and "not compared on the same records" in unreadable.reason


@pytest.mark.parametrize(
    ("tag", "allowed", "passed"),
    [("true", False, True), ("false", False, False), (None, False, False), ("false", True, True)]
    + [(None, True, True)],
)
def test_the_noise_gate_passes_secret_seeds_only_unless_allowed(tag, allowed, passed):
    """Seeded from finetune.seed ("false", or no tag: every run before secret seeds) is
    refused, naming the fix, unless registry.gates.allow_reproducible_noise."""
    tags = {k: v for k, v in SAFE.items() if k != "secret_noise"} | {"utility.test_perplexity": "9"}
    tags |= {} if tag is None else {"secret_noise": tag}
    gates = Gates(allow_reproducible_noise=allowed)
    results = {g.gate: g for g in evaluate_gates(gates, tags, None)}
    assert results["noise"].passed is passed
    assert all(g.passed for name, g in results.items() if name != "noise")
    if not passed:
        assert "finetune.secret_noise: true" in results["noise"].reason


def test_a_non_private_model_has_no_noise_gate_to_fail():
    tags = {k: v for k, v in SAFE.items() if k != "secret_noise"} | {"epsilon": "inf"}
    results = {g.gate: g for g in evaluate_gates(Gates(), tags, None)}
    assert results["noise"].passed and not results["epsilon"].passed


@pytest.mark.parametrize(
    ("higher_is_better", "low", "high", "tolerance", "passed", "verdict"),
    [
        (False, -3.0, -0.5, 0.0, True, "better beyond the noise"),  # perplexity down for sure
        (False, -3.0, 0.5, 0.0, False, "not better beyond the noise"),  # within the noise
        (False, -3.0, 0.5, 0.5, True, "no worse than the tolerance allows"),  # non-inferior
        (False, 0.25, 2.0, 0.0, False, "worse beyond the noise"),
        (True, 0.01, 0.2, 0.0, True, "better beyond the noise"),  # accuracy up for sure
        (True, -0.05, 0.2, 0.0, False, "not better beyond the noise"),
        (True, -0.05, 0.2, 0.05, True, "no worse than the tolerance allows"),
    ],
)
def test_utility_gate_reads_the_unfavourable_end_of_the_paired_interval(
    higher_is_better, low, high, tolerance, passed, verdict
):
    """With `utility_confidence` the gate judges the difference by its paired-bootstrap
    interval: promoted only when even its unfavourable end clears the tolerance."""
    from privtune.registry.paired import PAIRED_TAG, Paired

    metric = "medication_accuracy" if higher_is_better else "test_perplexity"
    champion = Champion(0.5 if higher_is_better else 40.0, metric)
    champion.tags["evaluated_on"] = "same"
    value = 0.6 if higher_is_better else 38.5
    compared = Paired(
        "1",
        "same",
        metric,
        value,
        0.5 if higher_is_better else 40.0,
        records=80,
        confidence=0.95,
        low=low,
        high=high,
        measured=False,
        resamples=2000,
    )
    tags = SAFE | {f"utility.{metric}": repr(value), "evaluated_on": "same"}
    gates = {"utility_metric": metric, "higher_is_better": higher_is_better}
    gate = _gates(
        tags | {PAIRED_TAG: compared.to_tag()}, champion, utility_tolerance=tolerance, **gates
    )["utility"]
    assert gate.passed is passed and verdict in gate.reason
    worst = low if higher_is_better else -high
    assert gate.margin == pytest.approx(worst + tolerance)
    assert f"95% interval [{low:+.4g}, {high:+.4g}] over 80 records" in gate.reason
    assert "side by side" not in gate.reason  # read from the registered scores, not measured
    # the same comparison judged without an interval: the two numbers alone pass
    assert _gates(tags, champion, **gates, **POINT)["utility"].passed


def test_utility_gate_without_a_paired_comparison_at_its_confidence_refuses():
    """No interval for this champion, data, metric and confidence (not compared yet, an older
    comparison at another confidence, or it failed): refused, naming the way out."""
    from privtune.registry.paired import PAIRED_TAG, Paired

    champion = Champion(40.0)
    champion.tags["evaluated_on"] = "same"
    tags = SAFE | {"utility.test_perplexity": "30.0", "evaluated_on": "same"}
    compared = Paired("1", "same", "test_perplexity", 30.0, 40.0, confidence=0.95, low=-11.0)
    compared = replace(compared, high=-9.0, resamples=2000)
    assert _gates(tags | {PAIRED_TAG: compared.to_tag()}, champion)["utility"].passed
    stale = (
        replace(compared, confidence=0.9),  # asked at another confidence
        replace(compared, confidence=None, low=None, high=None, resamples=None),  # none
        replace(compared, resamples=500),  # another number of resamples
        replace(compared, champion="2"),  # against another champion
    )
    for tag in ({}, *({PAIRED_TAG: p.to_tag()} for p in stale)):
        gate = _gates(tags | tag, champion)["utility"]
        assert not gate.passed and gate.margin is None
        assert "no interval of the difference; not compared on the same records" in gate.reason
        assert "utility_confidence: null" in gate.reason
    failed = replace(compared, value=None, champion_value=None, error="v1 has no scores")
    gate = _gates(tags | {PAIRED_TAG: failed.to_tag()}, champion)["utility"]
    assert not gate.passed and "comparing both on the same records failed: v1 has" in gate.reason


def test_the_rollback_command_says_what_it_did_in_words_or_json(monkeypatch, tmp_path, capsys):
    from privtune.cli import main
    from privtune.registry import promotion

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("registry: {name: m}\n")
    (tmp_path / "mlflow.db").write_bytes(b"SQLite format 3\x00")  # a store (the fake's) is there
    fake = FakeRegistry(["1", "2", "3"], ["1", "2", "3"])
    monkeypatch.setattr(promotion, "client", lambda root: fake)
    assert main(["--root", str(tmp_path), "rollback"]) == 0
    assert capsys.readouterr().out == (
        "m: champion v3 -> v2 (rolled back: v3's page says so; its gate decision is kept)\n"
    )
    assert main(["--root", str(tmp_path), "rollback", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done == {"name": "m", "from_version": "2", "to_version": "1", "warning": None}
