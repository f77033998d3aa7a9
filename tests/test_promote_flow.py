"""promote, promote_best and rollback on an in-memory registry: which alias moves where, what
the history holds, which version wins, and a retried decision (issue 21).

The fake answers the MlflowClient calls promotion makes as MLflow does (a missing alias or
version raises MlflowException), so these run in milliseconds without a tracking store; the
registry tests (test_registry.py) check the same flow once against a real MLflow store.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from privtune.errors import ModelError
from privtune.registry import Gates, promotion
from privtune.registry.promotion import HISTORY_TAG, PREVIOUS
from tests.test_promotion_gates import SAFE as GATE_SAFE

SAFE = {"method": "dpsgd", **GATE_SAFE}  # tags every default gate passes


def _missing(what: str) -> Exception:
    return MlflowException(f"{what} not found", error_code=RESOURCE_DOES_NOT_EXIST)


class _Version:
    def __init__(self, version: str, tags: dict[str, str]) -> None:
        self.version = version
        self.tags = dict(tags)
        self.source = f"models:/m-{version}"
        self.description = ""


class _Model:
    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.description = ""


class Registry:
    """An in-memory MlflowClient for one registered model, "m", as far as promotion uses it: a
    call naming any other model fails as MLflow's does (so a name lost on the way is caught)."""

    NAME = "m"

    def __init__(self) -> None:
        self.versions: dict[str, _Version] = {}
        self.model = _Model()
        self.aliases: dict[str, str] = {}

    def _model(self, name: str) -> None:
        if name != self.NAME:
            raise _missing(f"registered model {name!r}")

    def add(self, perplexity: float, **tags: str) -> str:
        self.created = getattr(self, "created", 0) + 1  # MLflow never reuses a number
        version = str(self.created)
        self.versions[version] = _Version(
            version, SAFE | {"utility.test_perplexity": repr(perplexity)} | tags
        )
        self.aliases["challenger"] = version
        return version

    # registered model
    def get_registered_model(self, name: str) -> _Model:
        self._model(name)
        return self.model

    def set_registered_model_tag(self, name: str, key: str, value: str) -> None:
        self._model(name)
        self.model.tags[key] = value

    def delete_registered_model_tag(self, name: str, key: str) -> None:
        self._model(name)
        del self.model.tags[key]

    def update_registered_model(self, name: str, description: str) -> None:
        self._model(name)
        self.model.description = description

    # aliases
    def set_registered_model_alias(self, name: str, alias: str, version: Any) -> None:
        self._model(name)
        if str(version) not in self.versions:
            raise _missing(f"Model Version (name={name}, version={version})")
        self.aliases[alias] = str(version)

    def delete_registered_model_alias(self, name: str, alias: str) -> None:
        self._model(name)
        if alias not in self.aliases:
            raise _missing(f"alias {alias}")
        del self.aliases[alias]

    def get_model_version_by_alias(self, name: str, alias: str) -> _Version:
        self._model(name)
        if alias not in self.aliases:
            raise _missing(f"alias {alias}")
        return self.versions[self.aliases[alias]]

    # versions
    def get_model_version(self, name: str, version: Any) -> _Version:
        self._model(name)
        if str(version) not in self.versions:
            raise _missing(f"version {version}")
        return self.versions[str(version)]

    def search_model_versions(self, query: str) -> list[_Version]:
        return list(self.versions.values()) if query == f"name = '{self.NAME}'" else []

    def set_model_version_tag(self, name: str, version: Any, key: str, value: str) -> None:
        self._model(name)
        self.versions[str(version)].tags[key] = value

    def delete_model_version_tag(self, name: str, version: Any, key: str) -> None:
        self._model(name)
        del self.versions[str(version)].tags[key]

    def update_model_version(self, name: str, version: Any, description: str) -> None:
        self._model(name)
        self.versions[str(version)].description = description

    def get_logged_model(self, model_id: str) -> Any:
        return SimpleNamespace(artifact_location=f"/nowhere/{model_id}/artifacts")

    def history(self) -> list[str]:
        return json.loads(self.model.tags.get(HISTORY_TAG, "[]"))


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Registry:
    monkeypatch.chdir(tmp_path)  # the default store's promotion lock sits beside mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fake = Registry()
    fake.roots = []  # the project root of every client asked for: "." unless given

    def client(root: Any) -> Registry:
        fake.roots.append(str(root))
        return fake

    def download_artifacts(artifact_uri: str, dst_path: str, tracking_uri: str) -> str:
        fake.card_uris.append(tracking_uri)  # the store the model card is read from
        raise OSError(f"{artifact_uri} is not stored")  # the card then comes from the tags

    fake.card_uris = []
    # the utility gate on the two numbers: these versions have no per-record scores to pair
    # (the interval is tested with real ones in test_paired_utility.py)
    monkeypatch.setattr(
        promotion, "Gates", lambda **kw: Gates(**({"utility_confidence": None} | kw))
    )
    monkeypatch.setattr(promotion, "client", client)
    monkeypatch.setattr(promotion, "tracking_uri", lambda root: f"sqlite:///{root}/mlflow.db")
    monkeypatch.setattr("mlflow.artifacts.download_artifacts", download_artifacts)
    return fake


def test_first_promotion_makes_a_champion_without_a_previous_one(registry: Registry) -> None:
    v1 = registry.add(40.0)
    decision = promotion.promote("m")
    assert decision.promoted and decision.version == v1 and decision.champion_before is None
    assert registry.aliases == {"champion": v1}  # the challenger alias is consumed
    assert registry.history() == [v1]
    assert registry.versions[v1].tags["promotion.decision"] == "promoted"
    assert registry.versions[v1].tags["promotion.failed"] == "none"
    assert registry.model.tags["champion"] == f"v{v1}"


def test_a_better_challenger_takes_over_and_the_champion_becomes_previous(
    registry: Registry,
) -> None:
    v1 = registry.add(40.0)
    promotion.promote("m")
    v2 = registry.add(39.0)
    decision = promotion.promote("m")
    assert decision.promoted and decision.champion_before == v1
    assert registry.aliases == {"champion": v2, PREVIOUS: v1}
    assert registry.history() == [v1, v2]


def test_a_refused_challenger_moves_nothing(registry: Registry) -> None:
    v1 = registry.add(40.0)
    promotion.promote("m")
    v2 = registry.add(41.0)  # worse perplexity
    decision = promotion.promote("m")
    assert not decision.promoted and [g.gate for g in decision.failed] == ["utility"]
    assert registry.aliases == {"champion": v1, "challenger": v2}
    assert registry.history() == [v1]
    assert registry.versions[v2].tags["promotion.decision"] == "refused"
    assert registry.versions[v2].tags["promotion.failed"] == "utility"


def test_promoting_an_explicit_version_keeps_the_other_challenger(registry: Registry) -> None:
    v1 = registry.add(40.0)
    v2 = registry.add(39.0)  # the challenger alias now names v2
    decision = promotion.promote("m", version=v1)
    assert decision.promoted and registry.aliases == {"champion": v1, "challenger": v2}


def test_promoting_the_champion_again_or_nothing_is_an_error(registry: Registry) -> None:
    with pytest.raises(ModelError) as err:
        promotion.promote("m")
    assert str(err.value) == ("m@challenger: no challenger to promote. Fix: register a model first")
    with pytest.raises(ModelError) as err:
        promotion.rollback("m")
    assert str(err.value) == (
        "m privtune.champion_history: no previous champion to roll back to (none yet). Fix: a "
        "rollback needs two promotions: promote another version first"
    )
    with pytest.raises(ModelError) as err:
        promotion.rollback("nope")  # MLflow knows no such registered model
    assert str(err.value) == "nope: no such registered model. Fix: register a model first"
    v1 = registry.add(40.0)
    promotion.promote("m")
    with pytest.raises(ModelError) as err:
        promotion.promote("m", version=v1)
    assert str(err.value) == "m v1: already the champion. Fix: register a new challenger"
    with pytest.raises(ModelError, match="no version 9"):
        promotion.promote("m", version="9")
    assert set(registry.roots) == {"."}  # the current directory's store unless told
    registry.add(39.0)
    promotion.promote_best("m", root="elsewhere")
    assert set(registry.roots[-3:]) == {"elsewhere"}
    assert registry.card_uris[-1] == "sqlite:///elsewhere/mlflow.db"
    promotion.pending_versions("m", root="elsewhere")
    assert registry.roots[-1] == "elsewhere"
    assert promotion.pending_versions("m") == [] and registry.roots[-1] == "."


def test_a_rolled_back_champion_is_not_returned_to_though_it_was_champion_before(
    registry: Registry,
) -> None:
    """v1, v2, then v1 again as champions: rolling v1 back gives v2 the alias, and a second
    rollback has nowhere to go (it returned to v1, the version just rolled back)."""
    v1, v2 = registry.add(40.0), registry.add(39.0)
    registry.model.tags[HISTORY_TAG] = json.dumps([v1, v2, v1])
    registry.aliases = {"champion": v1, PREVIOUS: v2}
    back = promotion.rollback("m")
    assert (back.from_version, back.to_version) == (v1, v2) and registry.history() == [v2]
    assert registry.aliases == {"champion": v2}
    with pytest.raises(ModelError, match="no previous champion"):
        promotion.rollback("m")
    assert registry.aliases["champion"] == v2


def test_a_rollback_undoes_a_champion_moved_by_hand(registry: Registry) -> None:
    """`champion` moved in MLflow's UI to v3, which no promotion chose: the rollback demoted
    v2 (the history's last, not champion) and gave the alias to v1. It now gives it back to
    v2, the last champion the gates chose, and marks v3; the history is unchanged."""
    v1 = registry.add(40.0)
    promotion.promote("m")
    v2 = registry.add(39.0)
    promotion.promote("m")
    v3 = registry.add(45.0)
    registry.aliases["champion"] = v3  # by hand
    back = promotion.rollback("m")
    assert (back.from_version, back.to_version) == (v3, v2)
    assert registry.aliases == {"champion": v2, PREVIOUS: v1, "challenger": v3}
    assert registry.history() == [v1, v2]
    assert "promotion.rolled_back" in registry.versions[v3].tags
    assert "set on this version by hand" in registry.versions[v3].description
    assert "promotion.rolled_back" not in registry.versions[v2].tags
    assert registry.model.description.startswith(f"**Champion: v{v2} (dpsgd)**, promoted")
    back = promotion.rollback("m")  # and a rollback after it walks the history as before
    assert (back.from_version, back.to_version) == (v2, v1)


def test_a_champion_restored_by_rollback_after_a_refusal_is_not_called_set_by_hand(
    registry: Registry,
) -> None:
    """v1 judged again (`--version 1`) against champion v2 and refused, then v2 rolled back:
    the model's page called v1 "set by hand, not judged by the gates"."""
    v1 = registry.add(40.0)
    promotion.promote("m")
    registry.add(39.0)
    promotion.promote("m")
    assert not promotion.promote("m", version=v1).promoted  # worse than v2
    back = promotion.rollback("m")
    assert registry.aliases["champion"] == v1
    assert back.warning and back.warning.startswith("v1's last judgement was refused: utility")
    page = registry.model.description
    assert "champion again by `privtune rollback`" in page and "set by hand" not in page
    assert "its last judgement: refused: utility" in page


def test_a_version_promoted_again_after_its_rollback_is_no_longer_marked_rolled_back(
    registry: Registry,
) -> None:
    v1 = registry.add(40.0)
    promotion.promote("m")
    v2 = registry.add(39.0)
    promotion.promote("m")
    promotion.rollback("m")
    assert "promotion.rolled_back" in registry.versions[v2].tags
    assert registry.versions[v2].description.startswith("**ROLLED BACK**")
    assert promotion.promote("m", version=v2).promoted
    assert "promotion.rolled_back" not in registry.versions[v2].tags
    assert not registry.versions[v2].description.startswith("**ROLLED BACK**")
    assert registry.history() == [v1, v2]


def test_a_promotion_stopped_after_the_alias_moved_is_completed_by_its_rerun(
    registry: Registry,
) -> None:
    """SIGTERM after the alias moved, before the model's page was rewritten: the page named the
    champion before, and the rerun (as exit 130's message asks) said "already the champion"
    and left it so."""
    v1 = registry.add(40.0)
    promotion.promote("m")
    v2 = registry.add(39.0)
    promotion.promote("m")
    registry.model.tags["champion"] = f"v{v1}"  # as the stopped run left the page
    registry.model.description = f"**Champion: v{v1} (dpsgd)**, ..."
    with pytest.raises(ModelError, match="already the champion"):
        promotion.promote("m", version=v2)
    assert registry.model.tags["champion"] == f"v{v2}"
    assert registry.model.description.startswith(f"**Champion: v{v2} (dpsgd)**")


MUTATIONS = (
    "set_registered_model_tag",
    "delete_registered_model_tag",
    "update_registered_model",
    "set_registered_model_alias",
    "delete_registered_model_alias",
    "set_model_version_tag",
    "delete_model_version_tag",
    "update_model_version",
)


class Killed(BaseException):
    """SIGTERM's KeyboardInterrupt as promotion meets it: not an Exception, nothing catches it."""


def _kill_after(registry: Registry, writes: int) -> list[int]:
    """The registry takes `writes` more changes, then the run is killed; the list counts down
    the changes left (how many a run made: `writes` minus what is left)."""
    left = [writes]
    for method in MUTATIONS:
        real = getattr(Registry, method)

        def cut(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            if left[0] == 0:
                raise Killed
            left[0] -= 1
            return _real(registry, *args, **kwargs)

        setattr(registry, method, cut)
    return left


def _revive(registry: Registry) -> None:
    for method in MUTATIONS:
        registry.__dict__.pop(method, None)


def _shown(registry: Registry) -> Any:
    """What the registry shows: aliases, tags and pages, times left out (a rerun is later)."""
    import re

    def untimed(text: str) -> str:
        return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", "<time>", text)

    versions = {
        v: ({k: untimed(t) for k, t in ver.tags.items()}, untimed(ver.description))
        for v, ver in registry.versions.items()
    }
    tags = {k: untimed(t) for k, t in registry.model.tags.items()}
    return dict(registry.aliases), tags, untimed(registry.model.description), versions


def _second_promotion(registry: Registry, writes: int | None) -> int:
    """v1 champion, then v2 (better) promoted with the run killed after `writes` registry
    changes (None: never); returns how many changes the promotion made before it ended."""
    registry.__init__()  # type: ignore[misc]
    registry.created = 0
    registry.add(40.0)
    promotion.promote("m")
    registry.add(39.0)
    left = _kill_after(registry, 10**6 if writes is None else writes)
    with contextlib.suppress(Killed):
        promotion.promote("m")
    _revive(registry)
    return 10**6 - left[0] if writes is None else writes


RERUNS = {
    "promote": lambda: promotion.promote_best("m"),  # the CLI's `privtune promote`
    "promote challenger": lambda: promotion.promote("m"),  # the promote flow's decide task
    "promote --version 2": lambda: promotion.promote("m", version="2"),
}


@pytest.mark.parametrize("rerun", list(RERUNS))
def test_a_promotion_killed_at_any_write_is_finished_by_the_rerun(
    registry: Registry, rerun: str
) -> None:
    """Killed between any two of its registry writes (SIGTERM lands anywhere), v2's promotion
    is finished by the rerun exit 130's message asks for: the registry shows what an
    uninterrupted promotion leaves (aliases, history once, v2's verdict, both pages). Before,
    a kill after the alias moved left v2 champion with no verdict (its page: "set by hand")
    and the rerun said "already the champion"."""
    writes = _second_promotion(registry, None)
    whole = _shown(registry)
    assert whole[0] == {"champion": "2", PREVIOUS: "1"} and writes > 5
    assert promotion.PROMOTING_TAG not in whole[1] and registry.history() == ["1", "2"]
    for cut in range(writes):
        _second_promotion(registry, cut)
        assert registry.model.tags.get(promotion.PROMOTING_TAG) is not None or cut == 0
        result = RERUNS[rerun]()
        assert _shown(registry) == whole, f"killed after {cut} writes"
        decision = result.decisions[0] if isinstance(result, promotion.Selection) else result
        assert (decision.version, decision.promoted) == ("2", True)
        assert decision.finished_late == (cut > 0)  # the decision is the first write
        if cut > 0:
            assert "finished now" in decision.summary()


def test_a_rollback_after_a_killed_promotion_undoes_all_of_it(registry: Registry) -> None:
    """The rollback finishes the stopped promotion first: v2 leaves the history and is marked
    rolled back, as after a whole one (it was left unjudged, for the next run to promote)."""
    writes = _second_promotion(registry, None)
    promotion.rollback("m")
    whole = _shown(registry)
    assert whole[0] == {"champion": "1"} and registry.history() == ["1"]
    for cut in range(1, writes):
        _second_promotion(registry, cut)
        back = promotion.rollback("m")
        assert (back.from_version, back.to_version) == ("2", "1")
        assert _shown(registry) == whole, f"killed after {cut} writes"


def test_the_promote_flow_finishes_a_promotion_that_took_the_challenger_alias(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The nightly flow's `challenger` task found no challenger (the stopped promotion had
    consumed it) and reported nothing to promote, leaving v2 without its verdict."""
    import flows.promote

    _second_promotion(registry, 5)  # the decision, history, both aliases, the challenger's gone
    assert "challenger" not in registry.aliases
    monkeypatch.setattr(flows.promote, "_registry", lambda root: SimpleNamespace(name="m"))
    register_module = importlib.import_module("privtune.registry.register")
    monkeypatch.setattr(register_module, "client", lambda root: registry)
    assert flows.promote.challenger.fn(".") == "2"
    assert promotion.promote("m", version="2").finished_late
    assert flows.promote.challenger.fn(".") is None  # then nothing is left to do


def test_a_killed_promotion_is_not_finished_over_a_champion_set_by_hand(
    registry: Registry,
) -> None:
    """A champion moved to a third version in MLflow's UI after the kill stands: the stopped
    promotion is forgotten, not applied over it."""
    _second_promotion(registry, 3)  # the decision, the history and the alias written
    assert registry.aliases["champion"] == "2"
    assert promotion.stopped_promotion("m") == "2"
    v3 = registry.add(45.0)
    registry.aliases["champion"] = v3  # by hand
    with pytest.raises(ModelError, match="already the champion"):
        promotion.promote("m", version=v3)
    assert registry.aliases["champion"] == v3 and promotion.stopped_promotion("m") is None
    assert "promotion.decision" not in registry.versions["2"].tags
    assert registry.history() == ["1"]  # a rollback does not return to v2


def _delete(registry: Registry, version: str) -> None:
    """A version deleted in MLflow's UI: its aliases go with it."""
    del registry.versions[version]
    registry.aliases = {a: v for a, v in registry.aliases.items() if v != version}


def test_a_stopped_promotion_over_a_champion_deleted_since_is_finished_without_previous(
    registry: Registry,
) -> None:
    """Stopped after the alias moved, then v1 (the champion before) deleted: finishing it set
    `previous_champion` on v1 and failed, and so did every promote and rollback after."""
    for writes in (3, 2):  # after the champion alias moved; before it (v1's goes with v1)
        _second_promotion(registry, writes)
        _delete(registry, "1")
        assert promotion.promote_best("m").chosen == "2"
        assert registry.aliases == {"champion": "2"}
        assert promotion.PROMOTING_TAG not in registry.model.tags


@pytest.mark.parametrize("damage", ["unreadable", "deleted"])
def test_a_stopped_promotion_that_cannot_be_finished_is_forgotten_not_blocking(
    registry: Registry, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """A record edited by hand, or naming a version deleted since, made every promote and
    rollback fail (exit 5, or 'no challenger' for good). It is forgotten, saying why, its
    history entry undone, and the next promotion judges as usual."""
    _second_promotion(registry, 2)  # decision and history written, the alias not moved
    assert registry.history() == ["1", "2"] and registry.aliases["champion"] == "1"
    if damage == "unreadable":
        registry.model.tags[promotion.PROMOTING_TAG] = '{"decision": {"version": "2"'
        registry.model.tags[HISTORY_TAG] = json.dumps(["1"])  # undone by hand too
    else:
        _delete(registry, "2")
    assert promotion.stopped_promotion("m") is None
    v3 = registry.add(38.0)
    assert promotion.promote_best("m").chosen == v3
    err = capsys.readouterr().err
    assert "forgot a promotion" in err and ("cannot be read" in err or "deleted" in err)
    assert promotion.PROMOTING_TAG not in registry.model.tags
    assert registry.history() == ["1", v3] and registry.aliases["champion"] == v3


def test_the_stopped_promotion_and_the_new_candidates_are_both_reported(
    registry: Registry,
) -> None:
    """Finished while other versions waited: it was applied but left out of the result, which
    said 'nothing promoted' (exit 1) though v2 had become champion."""
    _second_promotion(registry, 4)
    v3 = registry.add(45.0)  # worse than v2: refused
    selection = promotion.promote_best("m")
    assert selection.chosen == "2" and registry.aliases["champion"] == "2"
    assert [(d.version, d.promoted) for d in selection.decisions] == [("2", True), (v3, False)]
    assert selection.why.startswith("finished the promotion of v2")
    assert set(selection.methods) == {"2", v3}
    v4 = registry.add(30.0)  # better: promoted over the finished one
    _stop_then(registry, 1, lambda: promotion.promote("m", version=v4))
    assert registry.aliases["champion"] == "2"
    v5 = registry.add(29.0)
    selection = promotion.promote_best("m")
    assert [d.version for d in selection.decisions if d.promoted] == [v5, v4]
    assert registry.history() == ["1", "2", v4, v5]


def _stop_then(registry: Registry, writes: int, run: Any) -> None:
    _kill_after(registry, writes)
    with contextlib.suppress(Killed):
        run()
    _revive(registry)


def test_the_models_page_says_a_promotion_stopped_not_a_rollback(registry: Registry) -> None:
    """Stopped after the alias moved, before the verdict: register's page rewrite called the
    champion 'champion again by rollback (its last judgement: none)'."""
    _second_promotion(registry, 3)
    promotion.describe_registered_model(registry, "m")
    page = registry.model.description
    assert "stopped before the registry showed it all" in page and "rollback`, which" not in page


def test_a_rollback_records_a_champion_given_back_by_hand_to_an_earlier_one(
    registry: Registry,
) -> None:
    """v1, v2, v3 champions; an operator gives `champion` back to v2 in MLflow's UI: the
    rollback gave it to v3 again (the version just demoted). It records the hand's rollback:
    v3 leaves the history, marked rolled back; v2 stays champion."""
    for perplexity in (40.0, 39.0, 38.0):
        registry.add(perplexity)
        promotion.promote("m")
    registry.aliases["champion"] = "2"  # by hand
    back = promotion.rollback("m")
    assert (back.from_version, back.to_version) == ("3", "2")
    assert registry.aliases == {"champion": "2", PREVIOUS: "1"} and registry.history() == ["1", "2"]
    assert "by hand, which `privtune rollback` recorded" in registry.versions["3"].description
    assert "promotion.rolled_back" not in registry.versions["2"].tags
    assert (promotion.rollback("m").to_version, registry.history()) == ("1", ["1"])


def test_a_rollback_skips_versions_deleted_since(registry: Registry) -> None:
    for perplexity in (40.0, 39.0, 38.0):
        registry.add(perplexity)
        promotion.promote("m")
    _delete(registry, "2")
    back = promotion.rollback("m")
    assert (back.from_version, back.to_version) == ("3", "1") and registry.history() == ["1"]


def test_a_utility_metric_no_version_has_is_bad_input_not_a_refusal(registry: Registry) -> None:
    """`registry.gates.utility_metric: test_perplexityy` refused every version for good
    ("missing: cannot check"); now nothing is judged and the error lists the metrics there."""
    from privtune.errors import ConfigError

    v1 = registry.add(40.0)
    typo = promotion.Gates(utility_metric="test_perplexityy")
    for judge in (
        lambda: promotion.promote("m", typo),
        lambda: promotion.promote("m", typo, version=v1),
        lambda: promotion.promote_best("m", typo),
    ):
        with pytest.raises(
            ConfigError, match=r"no registered version of m carries `test_perplexityy`"
        ):
            judge()
    assert "promotion.decision" not in registry.versions[v1].tags and registry.history() == []
    with pytest.raises(
        ConfigError, match="use one they carry or privtune's own: .*test_perplexity"
    ):
        promotion.promote("m", typo)
    assert promotion.promote("m").promoted  # the metric they have


def test_promote_flow_decision_is_idempotent_under_retry(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """The flow pins the challenger's version before deciding, so a retried `decide` (after a
    promotion that consumed the challenger alias) reports the promotion, not "nothing to
    promote", and promotes nothing twice."""
    import importlib

    from flows import promote as flow

    logged: list[str] = []
    logger = SimpleNamespace(info=lambda message, *args: logged.append(message % args))
    register = importlib.import_module("privtune.registry.register")
    monkeypatch.setattr(register, "client", lambda root=".": registry)
    monkeypatch.setattr(flow, "get_run_logger", lambda: logger)
    gates = "  gates:\n    utility_confidence: null\n"  # the two numbers (see the fixture)
    (tmp_path / "params.yaml").write_text("registry:\n  name: m\n" + gates)
    root = str(tmp_path)
    v1 = registry.add(40.0)
    promotion.promote("m")
    v2 = registry.add(39.0)
    assert flow.challenger.fn(root) == v2
    first = flow.decide.fn(root, v2)
    assert first["promoted"] is True and first["version"] == v2
    # the flow's log says what happened, as `privtune promote` prints it: verdict, gate table
    (report,) = logged
    assert report.startswith("m: promoted: all 7 gates hold")
    assert "version  method" in report and f"m v{v2}: PROMOTED to champion" in report
    retried = flow.decide.fn(root, v2)
    assert retried == {"name": "m", "version": v2, "promoted": True}
    assert registry.history() == [v1, v2]  # promoted once
    assert flow.challenger.fn(root) is None  # a later run has nothing to promote


@pytest.mark.parametrize("higher_is_better", [False, True])
def test_promote_best_picks_the_best_eligible_in_the_gates_direction(
    registry: Registry, higher_is_better: bool
) -> None:
    """Lower is better: the least value wins; higher is better: the greatest. A version that
    fails a gate is never chosen however good its utility, and ties go to the older one."""
    metric = "medication_accuracy" if higher_is_better else "test_perplexity"
    gates = Gates(utility_metric=metric, higher_is_better=higher_is_better, utility_confidence=None)
    values = {"a": 0.30, "b": 0.50, "c": 0.50, "d": 0.90, "e": 0.10}
    versions = {}
    for key, value in values.items():
        extra = {"epsilon": "9.0"} if key in ("d", "e") else {}  # d, e: over the epsilon gate
        versions[key] = registry.add(1.0, **{f"utility.{metric}": repr(value)}, **extra)
    selection = promotion.promote_best("m", gates)
    expected = versions["b"] if higher_is_better else versions["a"]  # b ties c: b is older
    assert selection.chosen == expected
    best = (
        "highest medication_accuracy (0.5)" if higher_is_better else "lowest test_perplexity (0.3)"
    )
    assert selection.why == f"v{expected} has the {best} of the 3 eligible candidate(s) out of 5"
    assert registry.aliases["champion"] == expected and registry.history() == [expected]
    decisions = {d.version: d for d in selection.decisions}
    assert selection.decisions[0].version == expected and decisions[expected].promoted
    # the others, judged against the new champion: worse is refused on utility, as good (the
    # tie) passes every gate and is refused as not chosen
    failed = (
        {"a": ["utility"], "c": ["best_candidate"], "d": ["epsilon"], "e": ["epsilon", "utility"]}
        if higher_is_better
        else {"b": ["utility"], "c": ["utility"], "d": ["epsilon", "utility"], "e": ["epsilon"]}
    )
    for key, gates_failed in failed.items():
        assert decisions[versions[key]].promoted is False
        assert decisions[versions[key]].champion_before == expected  # judged against it
        assert [g.gate for g in decisions[versions[key]].failed] == gates_failed
    assert set(registry.roots) == {"."}  # the current directory's store unless told


def test_promote_best_against_a_champion_and_with_nothing_eligible(registry: Registry) -> None:
    v1 = registry.add(40.0)
    promotion.promote("m")
    v2 = registry.add(41.0)  # worse than the champion
    v3 = registry.add(39.0, epsilon="inf")  # better, but not private
    selection = promotion.promote_best("m")
    assert selection.chosen is None and "none of 2" in selection.why
    assert registry.aliases["champion"] == v1 and registry.history() == [v1]
    assert [d.version for d in selection.decisions] == [v2, v3]
    v4 = registry.add(39.5)
    selection = promotion.promote_best("m")  # only v4 is new
    assert selection.chosen == v4 and registry.aliases["champion"] == v4
    assert registry.aliases[PREVIOUS] == v1 and registry.history() == [v1, v4]


def test_pending_versions_are_the_unjudged_ones_in_numeric_order(registry: Registry) -> None:
    for _ in range(11):
        registry.add(40.0)
    registry.versions["3"].tags["promotion.decision"] = "refused"
    pending = promotion.pending_versions("m")
    assert pending == [str(v) for v in range(1, 12) if v != 3]  # "10" after "9", not "1"


def test_promote_best_judges_the_challenger_again_once_every_version_was_judged(
    registry: Registry,
) -> None:
    """With nothing left unjudged, promote_best falls back to the challenger alias (a refused
    challenger keeps it, so it can be judged again after a new evaluation), and without one it
    is an error that says what to do."""
    v1 = registry.add(40.0)
    promotion.promote("m")  # consumes the challenger alias
    with pytest.raises(ModelError) as err:
        promotion.promote_best("m")
    assert str(err.value) == "m@challenger: no challenger to promote. Fix: register a model first"
    v2 = registry.add(41.0)
    assert not promotion.promote("m").promoted  # refused: v2 keeps the alias, judged
    assert promotion.pending_versions("m") == []
    selection = promotion.promote_best("m")
    assert selection.chosen is None and selection.methods == {v2: "dpsgd"}
    assert selection.why == "none of 1 candidate(s) passes every gate"
    assert [d.version for d in selection.decisions] == [v2]
    assert [g.gate for g in selection.decisions[0].failed] == ["utility"]
    registry.versions[v2].tags["utility.test_perplexity"] = "39.0"  # evaluated again, better
    selection = promotion.promote_best("m")
    assert selection.chosen == v2 and registry.aliases == {"champion": v2, PREVIOUS: v1}
    assert selection.why == (
        f"v{v2} has the lowest test_perplexity (39) of the 1 eligible candidate(s) out of 1"
    )
    assert registry.history() == [v1, v2]


def test_promote_best_promotes_under_its_own_gates_and_never_rejudges_the_champion(
    registry: Registry,
) -> None:
    """The chosen version is promoted under the gates promote_best was given (here a looser
    epsilon limit than the default 8: the defaults would refuse it); a passing candidate not
    chosen is refused by a failed `best_candidate` gate; a challenger alias pointing at the
    champion is no candidate."""
    gates = Gates(max_epsilon=10.0, utility_confidence=None)
    v1 = registry.add(40.0, epsilon="9.0")
    v2 = registry.add(40.0, epsilon="9.0")  # a tie goes to the older
    selection = promotion.promote_best("m", gates)
    assert selection.chosen == v1 and registry.aliases == {"champion": v1, "challenger": v2}
    first, second = selection.decisions
    assert first.version == v1 and first.promoted
    not_chosen = second.gates[-1]
    assert second.version == v2 and not second.promoted
    assert (not_chosen.gate, not_chosen.passed) == ("best_candidate", False)
    assert not_chosen.reason == f"v{v1} was chosen: better test_perplexity (40)"
    registry.aliases["challenger"] = v1  # pointed back at the champion by hand
    registry.versions[v2].tags["promotion.decision"] = "refused"  # nothing pending
    selection = promotion.promote_best("m", gates)
    assert selection.chosen is None and selection.decisions == ()
    assert selection.why == "none of 0 candidate(s) passes every gate"
    assert registry.history() == [v1]


def test_promote_best_with_no_champion_and_nothing_eligible(registry: Registry) -> None:
    """Every candidate refused, none before them: no champion is named, a version without a
    method tag is listed as "?", and every decision is recorded against the store asked for."""
    v1 = registry.add(40.0, epsilon="inf")
    del registry.versions[v1].tags["method"]
    selection = promotion.promote_best("m", root="there")
    assert selection.chosen is None and selection.methods == {v1: "?"}
    (decision,) = selection.decisions
    assert decision.promoted is False and decision.champion_before is None
    assert registry.card_uris == ["sqlite:///there/mlflow.db"]
    assert "champion" not in registry.aliases


def test_a_promotion_waits_for_the_one_in_progress(registry: Registry, capsys) -> None:
    """Two at once would judge against the same champion and interleave the history. The one
    waiting says so, and for whom (it was silent for up to its 10 minutes)."""
    import os
    import threading

    from privtune.registry.lock import registry_lock

    v1 = registry.add(40.0)
    done: list[Any] = []
    with registry_lock("."):  # another promotion (or a rollback) holds the store
        waiting = threading.Thread(target=lambda: done.append(promotion.promote("m")))
        waiting.start()
        waiting.join(timeout=2.5)
        assert waiting.is_alive() and not done and registry.aliases.get("champion") is None
        said = capsys.readouterr().err
        assert "waiting for another promotion (privtune pid" in said and str(os.getpid()) in said
    waiting.join(timeout=30)
    assert done and done[0].promoted and registry.aliases["champion"] == v1


def test_a_scheduled_promotion_does_not_judge_a_refused_challenger_again(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """The nightly pipeline's promotion (`choose`) judges what is new; a challenger refused
    by an earlier run is not judged again every night (`privtune promote` still does)."""
    import importlib

    from flows import promote as flow

    logged: list[str] = []
    logger = SimpleNamespace(info=lambda message, *args: logged.append(message % args))
    register = importlib.import_module("privtune.registry.register")
    monkeypatch.setattr(register, "client", lambda root=".": registry)
    monkeypatch.setattr(flow, "get_run_logger", lambda: logger)
    gates = "  gates:\n    utility_confidence: null\n"
    (tmp_path / "params.yaml").write_text("registry:\n  name: m\n" + gates)
    root = str(tmp_path)
    v1 = registry.add(40.0)
    v2 = registry.add(41.0)
    decisions = flow.choose.fn(root)
    assert {d["version"]: d["promoted"] for d in decisions} == {v1: True, v2: False}
    assert registry.aliases["challenger"] == v2  # refused: it keeps the alias
    logged.clear()
    assert flow.choose.fn(root) == [
        {"name": "m", "version": None, "promoted": False, "nothing_to_promote": True}
    ]
    assert logged == [f"nothing to promote: no new version of m (challenger v{v2} judged already)"]
    assert registry.versions[v2].tags["promotion.decision"] == "refused"
    # a retry of the task (its first attempt may have failed after recording its decision)
    # rebuilds the decision: the challenger is judged again
    monkeypatch.setattr(flow, "_retried", lambda: True)
    assert [d["version"] for d in flow.choose.fn(root)] == [v2]
    monkeypatch.setattr(flow, "_retried", lambda: False)
    v3 = registry.add(39.0)
    assert [d["version"] for d in flow.choose.fn(root) if d["promoted"]] == [v3]
