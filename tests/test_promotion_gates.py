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

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.registry import Gates, evaluate_gates

SAFE = {
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
    )
    assert _utility(gates, challenger, champion) is passed


@pytest.mark.parametrize("higher_is_better", [False, True])
@pytest.mark.parametrize(
    ("challenger", "champion"), [(math.nan, 40.0), (40.0, math.nan), (math.nan, math.nan)]
)
def test_utility_gate_refuses_nan(higher_is_better, challenger, champion):
    gates = Gates(higher_is_better=higher_is_better, utility_tolerance=1.0)
    assert _utility(gates, challenger, champion) is False


def test_utility_gate_on_infinities():
    lower = Gates()  # perplexity: lower is better
    assert _utility(lower, math.inf, 40.0) is False  # a diverged model never wins
    assert _utility(lower, 40.0, math.inf) is True
    higher = Gates(utility_metric="medication_accuracy", higher_is_better=True)
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
        self.version, self.tags = version, {"method": "dpsgd"}


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

    def get_registered_model(self, name):
        return self.model

    def set_registered_model_tag(self, name, key, value):
        self.model.tags[key] = value

    def set_registered_model_alias(self, name, alias, version):
        self.aliases[alias] = str(version)

    def delete_registered_model_alias(self, name, alias):
        del self.aliases[alias]

    def get_model_version_by_alias(self, name, alias):
        from mlflow.exceptions import MlflowException

        if alias not in self.aliases:
            raise MlflowException(f"no alias {alias}")
        return self.versions[self.aliases[alias]]

    def set_model_version_tag(self, name, version, key, value):
        self.versions[str(version)].tags[key] = value

    def search_model_versions(self, query):
        return list(self.versions.values())

    def update_registered_model(self, name, description):
        self.model.description = description


def test_rollback_through_three_champions_moves_previous_champion_too(monkeypatch):
    """Champions 1, 2, 3: each rollback hands `champion` back one step and `previous_champion`
    with it (never left naming the version now champion), then removes it at the first."""
    from privtune.registry import promotion

    fake = FakeRegistry(["1", "2", "3"], ["1", "2", "3"])
    monkeypatch.setattr(promotion, "client", lambda root=".": fake)
    back = promotion.rollback("m")
    assert (back.from_version, back.to_version) == ("3", "2")
    assert fake.aliases == {"champion": "2", promotion.PREVIOUS: "1"}
    back = promotion.rollback("m")
    assert (back.from_version, back.to_version) == ("2", "1")
    assert fake.aliases == {"champion": "1"}
    assert json.loads(fake.model.tags[promotion.HISTORY_TAG]) == ["1"]
    assert fake.versions["3"].tags.get("promotion.rolled_back")
    with pytest.raises(promotion.ModelError, match="no previous champion"):
        promotion.rollback("m")
