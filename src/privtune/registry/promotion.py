"""Promotion gates: the `champion` alias moves only when the challenger keeps the privacy
contract, resists the attacks and is at least as useful as the current champion.

Every decision (each gate's value, threshold and margin) is written onto the version, so the
registry itself is the audit trail; `rollback` walks a history kept on the registered model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privtune.config import Gates, Params
from privtune.errors import ConfigError, ModelError
from privtune.registry.card import CARD_SCHEMA, gate_report, verdict_line, version_card
from privtune.registry.lock import registry_lock
from privtune.registry.paired import (
    PAIRED_TAG,
    needs_pairing,
    other_data,
    pair_with_champion,
    read_paired,
)
from privtune.registry.register import (
    ATTACK_PREFIX,
    CHALLENGER,
    CHAMPION,
    EVALUATED_ON_TAG,
    NOISE_TAG,
    UTILITY_FIELDS,
    UTILITY_PREFIX,
    client,
    tracking_uri,
)

PREVIOUS = "previous_champion"
HISTORY_TAG = "privtune.champion_history"  # JSON list of versions that were champion, in order
# A promotion being applied (its decision as JSON), from the moment the gates passed until the
# registry shows it: one stopped midway (SIGTERM, a lost connection) is finished by the next
# promote or rollback, so no version is left champion without its verdict, or the reverse.
PROMOTING_TAG = "privtune.promotion_in_progress"
MAX_TAG_TEXT = 500  # a tag is for search and a glance; the description has the whole story
MAX_LISTED = 4  # refused versions named in the registered model's description
MODEL_POLICY = (
    "Privately fine-tuned clinical-note generators (privtune), one version per method and "
    "evidence. A version becomes `champion` only through `privtune promote`, when every gate "
    "of `params.yaml: registry.gates` holds: spent ε and δ within their limits, the best "
    "membership-inference AUC and TPR at 1 % FPR within theirs by the lower bound of their "
    "confidence interval (a value above a gate within sampling noise passes, marked "
    "inconclusive), the audit's lower bound on ε "
    "at or below the claimed ε, and utility better than the champion's beyond the noise of "
    "the test split (the unfavourable end of the paired-bootstrap interval of the difference, "
    "plus `utility_tolerance`, at least 0). Each version's "
    "description opens with its verdict; its privacy model card (`model_card.md`) ships with "
    "the model. `privtune rollback` restores the previous champion."
)


INSUFFICIENT = "insufficient evidence"  # an attack gate with nothing to decide on: refused
INCONCLUSIVE = "inconclusive"  # an attack gate above its threshold within sampling noise: passes
# The utility gate when measuring the two models raised: refused this time, judged again by
# the next promotion (a scheduled run's included), up to MAX_ATTEMPTS, then refused for good.
UNMEASURED = "measurement failed"
MAX_ATTEMPTS = 3
UNJUDGED = "unjudged"  # promotion.decision while a failed measurement is to be tried again
ATTEMPTS_TAG = "promotion.attempts"  # failed measurements in a row (absent: none)


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool
    value: float | None
    threshold: float | None
    margin: float | None  # >= 0 is slack, < 0 is by how much the gate failed
    reason: str
    # Attack gates (decided on a confidence bound): "within" (point estimate within the
    # threshold), "inconclusive" (above it, but its lower bound is not: passes), "exceeds"
    # (the lower bound is above: refused) or INSUFFICIENT (no bound to decide on: refused).
    # The noise gate: "secret", "seeded" (from finetune.seed) or "none" (not private).
    evidence: str | None = None


@dataclass(frozen=True)
class Decision:
    name: str
    version: str
    promoted: bool
    champion_before: str | None
    gates: tuple[GateResult, ...]
    # a promotion decided by a run that stopped before the registry showed it, finished by
    # this one (the gates were judged then, not again)
    finished_late: bool = False

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    @property
    def unmeasured(self) -> bool:
        """Refused only because measuring the utility raised: worth judging again."""
        failed = self.failed
        return bool(failed) and all(g.evidence == UNMEASURED for g in failed)

    def summary(self) -> str:  # pragma: no mutate block
        verdict = "PROMOTED to champion" if self.promoted else "REFUSED"
        if self.unmeasured:
            verdict += " for now (measuring failed; the next promotion judges it again)"
        if self.finished_late:
            verdict += " (decided by a promotion that stopped before it was recorded; finished now)"
        lines = [
            f"{self.name} v{self.version}: {verdict} (champion before: "
            f"{'v' + self.champion_before if self.champion_before else 'none'})"
        ]
        lines += [f"  [{_verdict(g)}] {g.gate}: {g.reason}" for g in self.gates]
        return "\n".join(lines)

    def reason(self) -> str:  # pragma: no mutate block
        """Why, in one phrase: the failed gates with their numbers, or what the promotion
        rested on (the utility comparison)."""
        if not self.promoted:
            return "; ".join(f"{g.gate}: {g.reason}" for g in self.failed)
        utility = next((g for g in self.gates if g.gate == "utility"), None)
        detail = f"; {utility.reason}" if utility is not None else ""
        return f"all {len(self.gates)} gates hold{detail}"

    def headline(self) -> str:  # pragma: no mutate block
        """The decision as the verdict line ends with it."""
        verdict = "PROMOTED to champion" if self.promoted else "REFUSED"
        return f"{verdict}: {self.reason()}"

    def to_dict(self) -> dict[str, Any]:  # pragma: no mutate block
        return asdict(self) | {"failed": [g.gate for g in self.failed]}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Decision:
        """The decision `asdict` wrote (fields a newer privtune added are left out)."""
        known = {f.name for f in dataclasses.fields(GateResult)}
        gates = tuple(
            GateResult(**{k: v for k, v in g.items() if k in known}) for g in fields["gates"]
        )
        own = {f.name for f in dataclasses.fields(cls)} - {"gates"}
        return cls(**{k: v for k, v in fields.items() if k in own}, gates=gates)

    def __str__(self) -> str:
        return self.summary()


def _verdict(gate: GateResult) -> str:  # pragma: no mutate block
    if gate.evidence == INSUFFICIENT:
        return "NO EVIDENCE"
    if gate.evidence == UNMEASURED:
        return "NOT MEASURED"
    return "pass" if gate.passed else "FAIL"


def _number(tags: dict[str, str], key: str) -> float | None:
    """The tag's number; None when missing, unreadable or NaN. A NaN (an attack or evaluation
    that produced no number; JSON metrics files can hold one) is no evidence: read as a number
    it compares False both ways, and an attack gate would pass it as "within" its threshold."""
    try:
        value = float(tags[key])
    except (KeyError, ValueError):
        return None
    return None if math.isnan(value) else value


def _at_most(gate: str, value: float | None, threshold: float | None, what: str) -> GateResult:
    if value is None or threshold is None:
        missing = what if value is None else f"threshold for {gate}"
        return GateResult(gate, False, value, threshold, None, f"{missing} missing: cannot check")
    margin = threshold - value
    passed = value <= threshold
    relation = "<=" if passed else ">"
    reason = f"{value:.6g} {relation} {threshold:.6g} (margin {margin:+.6g})"
    return GateResult(gate, passed, value, threshold, margin, reason)


def _bounded(
    gate: str, value: float | None, lower: float | None, threshold: float, what: str, fix: str
) -> GateResult:
    """An attack gate decided on the lower confidence bound of the attack's success: refused
    only when the bound exceeds the threshold, so sampling noise (another attack seed, other
    members drawn) cannot flip the decision; no value or no bound is insufficient evidence."""
    if value is None or lower is None:
        reason = f"{INSUFFICIENT}: {what} missing ({fix})"
        return GateResult(gate, False, value, threshold, None, reason, INSUFFICIENT)
    margin = threshold - lower
    interval = f"{value:.6g}, lower confidence bound {lower:.6g}"
    if lower > threshold:
        reason = f"{interval} > {threshold:.6g}: the attack beats the gate (margin {margin:+.6g})"
        return GateResult(gate, False, value, threshold, margin, reason, "exceeds")
    if value > threshold:
        reason = (
            f"{interval} <= {threshold:.6g}: above the threshold only within sampling noise "
            f"(inconclusive; more members would tell)"
        )
        return GateResult(gate, True, value, threshold, margin, reason, INCONCLUSIVE)
    reason = f"{interval}; value <= {threshold:.6g} (margin {margin:+.6g})"
    return GateResult(gate, True, value, threshold, margin, reason, "within")


def _attack_gates(gates: Gates, tags: dict[str, str]) -> list[GateResult]:
    """The membership gates on the best score's value and the best lower bound."""
    auc = f"{ATTACK_PREFIX}mia_auc_max"
    tpr = f"{ATTACK_PREFIX}mia_tpr_at_fpr_0.01_max"
    attacked = auc in tags
    tpr_fix = (
        "the attack's non-members cannot resolve a 1 % FPR: it needs at least 100, so raise "
        "attack.members to 100 or more (the model card has the counts)"
        if attacked
        else "run the attack stage"
    )
    return [
        _bounded(
            "mia_auc",
            _number(tags, auc),
            _number(tags, f"{ATTACK_PREFIX}mia_auc_ci_low_max"),
            gates.max_mia_auc,
            "the best MIA AUC or its confidence bound",
            "run the attack stage (attack results recorded before bounds: rerun it)",
        ),
        _bounded(
            "mia_tpr_at_fpr_0.01",
            _number(tags, tpr),
            _number(tags, f"{ATTACK_PREFIX}mia_tpr_at_fpr_0.01_ci_low_max"),
            gates.max_mia_tpr_at_fpr_0_01,
            "the best TPR at 1 % FPR or its confidence bound",
            tpr_fix,
        ),
    ]


def _utility(gates: Gates, tags: dict[str, str], champion: Any | None) -> GateResult:
    key = f"{UTILITY_PREFIX}{gates.utility_metric}"
    value = _number(tags, key)
    if value is None:
        return GateResult("utility", False, None, None, None, f"{key} missing: cannot check")
    if champion is None:
        reason = f"{gates.utility_metric} {value:.6g}; no champion yet, nothing to beat"
        return GateResult("utility", True, value, None, None, reason)
    best = _number(dict(champion.tags), key)
    if best is None:
        reason = f"champion v{champion.version} has no {key}: cannot compare"
        return GateResult("utility", False, value, None, None, reason)
    where, paired = "", None
    mine = tags.get(EVALUATED_ON_TAG)
    if needs_pairing(gates, tags, champion):
        paired = read_paired(tags)
        if paired is None or not paired.matches(str(champion.version), mine, gates):
            why = (
                "; not compared on the same records: `privtune promote` compares both for a "
                "version that passes every other gate"
            )
            return _unjudged(gates, value, best, champion, tags, why)
        if paired.transient:  # not the data's fault: say so, not how to compare across data
            reason = (
                f"{gates.utility_metric} {value:.6g} vs champion v{champion.version} {best:.6g}: "
                f"comparing both on the same records failed ({paired.error}); the next "
                "`privtune promote` measures them again"
            )
            return GateResult("utility", False, value, best, None, reason, UNMEASURED)
        if paired.error is not None or paired.value is None or paired.champion_value is None:
            why = f"; comparing both on the same records failed: {paired.error}"
            return _unjudged(gates, value, best, champion, tags, why)
        value, best = paired.value, paired.champion_value
        if paired.measured:
            where = (
                f", both measured side by side on the {paired.records} test records of this "
                f"version's split that v{champion.version} never saw ({paired.excluded} it "
                "trained or validated on left out)"
            )
    elif other_data(gates, tags, champion):
        why = " (registry.gates.reevaluate_champion is off)"
        return _unjudged(gates, value, best, champion, tags, why)
    sign = 1.0 if gates.higher_is_better else -1.0
    direction = "higher" if gates.higher_is_better else "lower"
    head = f"{gates.utility_metric} {value:.6g} vs champion v{champion.version} {best:.6g}{where}"
    if paired is None or paired.low is None or paired.high is None:
        margin = sign * (value - best) + gates.utility_tolerance
        reason = f"{head} ({direction} is better; margin {margin:+.6g})"
        return GateResult("utility", margin >= 0, value, best, margin, reason)
    if math.isnan(paired.low) or math.isnan(paired.high):
        reason = f"{head}: the interval of the difference is not a number; cannot judge"
        return GateResult("utility", False, value, best, None, reason)
    # the interval's unfavourable end: a one-sided test at (1 + confidence) / 2
    worst = min(sign * paired.low, sign * paired.high)
    margin = worst + gates.utility_tolerance
    verdict = "better beyond the noise" if worst > 0 else "not better beyond the noise"
    if max(sign * paired.low, sign * paired.high) < 0:
        verdict = "worse beyond the noise"
    if margin >= 0 and worst <= 0:
        verdict = "no worse than the tolerance allows"
    reason = (
        f"{head} ({direction} is better): difference {value - best:+.4g}, "
        f"{paired.confidence:.0%} interval [{paired.low:+.4g}, {paired.high:+.4g}] over "
        f"{paired.records} records resampled in pairs: {verdict} (margin {margin:+.4g})"
    )
    return GateResult("utility", margin >= 0, value, best, margin, reason)


def _unjudged(
    gates: Gates, value: float, best: float, champion: Any, tags: dict[str, str], why: str
) -> GateResult:
    """The utility gate's refusal when the two numbers cannot be judged as they stand."""
    mine, theirs = tags.get(EVALUATED_ON_TAG), dict(champion.tags).get(EVALUATED_ON_TAG)
    if not other_data(gates, tags, champion):
        reason = (
            f"{gates.utility_metric} {value:.6g} vs champion v{champion.version} {best:.6g}: "
            f"no interval of the difference{why}; or set registry.gates.utility_confidence: "
            "null to judge the two numbers alone"
        )
        return GateResult("utility", False, value, best, None, reason)
    reason = (
        f"not comparable: {gates.utility_metric} {value:.6g} and champion "
        f"v{champion.version}'s {best:.6g} were measured on other test data, tokenizer or "
        f"task ({EVALUATED_ON_TAG} {mine} vs {theirs}){why}; review it, then set "
        f"registry.gates.utility_across_data: true to compare them anyway"
    )
    return GateResult("utility", False, value, best, None, reason)


def _noise(gates: Gates, tags: dict[str, str]) -> GateResult:
    """The guarantee holds only if the sampler's and the noise's seeds were secret; a run
    seeded from finetune.seed (published in params, MLflow and the card) can be replayed and
    its noise subtracted by anyone who has the params."""
    epsilon = _number(tags, "epsilon")
    if epsilon is not None and math.isinf(epsilon):
        reason = "not private: no noise to keep secret"
        return GateResult("noise", True, None, None, None, reason, "none")
    secret = tags.get(NOISE_TAG)
    if secret == "true":
        reason = "sampler and noise seeded from OS entropy, kept secret"
        return GateResult("noise", True, None, None, None, reason, "secret")
    seeded = (
        "sampler and noise seeded from finetune.seed (finetune.secret_noise: false)"
        if secret == "false"
        else f"no {NOISE_TAG} tag: trained before secret seeds, from finetune.seed"
    )
    if gates.allow_reproducible_noise:
        reason = f"{seeded}; allowed by registry.gates.allow_reproducible_noise"
        return GateResult("noise", True, None, None, None, reason, "seeded")
    reason = (
        f"{seeded}, which the params publish: anyone who has them can replay the batches and "
        f"subtract the noise; retrain with finetune.secret_noise: true"
    )
    return GateResult("noise", False, None, None, None, reason, "seeded")


def evaluate_gates(gates: Gates, tags: dict[str, str], champion: Any | None) -> list[GateResult]:
    """Each gate on a version's tags; a missing metric fails its gate, never passes."""
    epsilon = _number(tags, "epsilon")
    audit = _number(tags, f"{ATTACK_PREFIX}audit_epsilon_lower_bound")
    delta = _at_most("delta", _number(tags, "delta"), gates.max_delta, "delta")
    if delta.value is None and epsilon is not None and math.isinf(epsilon):
        # a non-private model has no delta to miss: say what it is
        delta = replace(delta, reason="not private: trained without an (epsilon, delta) bound")
    return [
        _at_most("epsilon", epsilon, gates.max_epsilon, "spent epsilon"),
        delta,
        _noise(gates, tags),
        *_attack_gates(gates, tags),
        _at_most(
            "audit",
            audit,
            epsilon,
            f"{ATTACK_PREFIX}audit_epsilon_lower_bound" if audit is None else "claimed epsilon",
        ),
        _utility(gates, tags, champion),
    ]


def alias_version(mlflow_client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _history(mlflow_client: Any, name: str) -> list[str]:
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow_client.get_registered_model(name)
    except MlflowException:
        raise ModelError(name, "no such registered model", "register a model first") from None
    return json.loads(model.tags.get(HISTORY_TAG, "[]"))


def _record(
    mlflow_client: Any,
    decision: Decision,
    gates: Gates,
    uri: str,
) -> None:  # pragma: no mutate block
    """The decision as a few tags, and the version's description rebuilt: the verdict line,
    this decision's gate table (replacing any earlier one) and the model card pointer."""
    from privtune.registry.register import artifacts_link, card_section

    name, version = decision.name, decision.version
    now = datetime.now(UTC).isoformat(timespec="seconds")
    current = mlflow_client.get_model_version(name, version)
    attempts = _attempts(dict(current.tags)) + 1 if decision.unmeasured else 0
    again = 0 < attempts < MAX_ATTEMPTS
    verdict = "promoted" if decision.promoted else UNJUDGED if again else "refused"
    headline = decision.headline()
    if again:
        headline = (
            f"NOT JUDGED YET (attempt {attempts} of {MAX_ATTEMPTS}; the next `privtune "
            f"promote` judges it again): {decision.reason()}"
        )
    elif attempts:
        headline += f" (measuring failed {attempts} times; `privtune promote --version "
        headline += f"{version}` tries again)"
    tags = {
        "promotion.decision": verdict,
        "promotion.reason": decision.reason()[:MAX_TAG_TEXT],
        "promotion.failed": ",".join(g.gate for g in decision.failed) or "none",
        "promotion.time": now,
    }
    if attempts:  # only while measurements fail: a version carries about a dozen tags
        tags[ATTEMPTS_TAG] = str(attempts)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value)
    for key in current.tags:  # per-gate tags of earlier releases: the table replaces them
        if key.startswith("gate.") or (key == ATTEMPTS_TAG and not attempts):
            mlflow_client.delete_model_version_tag(name, version, key)
    card = version_card(mlflow_client, current, uri)
    parts = [verdict_line(card, gates, headline), gate_report(decision, now)]
    if card.get("schema") == CARD_SCHEMA:
        parts.append(card_section(card, artifacts_link(mlflow_client, current)))
    mlflow_client.update_model_version(name, version, description="\n\n".join(parts))


def describe_registered_model(mlflow_client: Any, name: str) -> None:  # pragma: no mutate block
    """The registered model says who is champion and why, or why there is none (and how to
    judge the rest), above what the gates are."""
    versions = sorted(
        mlflow_client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)
    )
    champion = alias_version(mlflow_client, name, CHAMPION)
    refused = [v for v in versions if v.tags.get("promotion.decision") == "refused"]
    # (a champion set by hand, never judged, is not waiting)
    waiting = [
        v
        for v in versions
        if _waiting(dict(v.tags)) and (champion is None or v.version != champion.version)
    ]
    if champion is not None:
        tags = dict(champion.tags)
        if tags.get("promotion.decision") == "promoted":
            why = tags.get("promotion.reason", "")
            how = f"promoted {tags.get('promotion.time', '')}: {why}"
        elif _promoting_now(mlflow_client, name) == str(champion.version):
            why = "promoted by a run that stopped before the registry showed it all"
            how = f"{why} (the next `privtune promote` or `rollback` finishes it)"
        elif "promotion.decision" in tags and str(champion.version) in _history(
            mlflow_client, name
        ):
            # a rollback gave it back, and a later promotion had judged it again and refused
            # it (`--version N` against a newer champion): a rollback judges no gate
            last = tags["promotion.decision"]
            why = "champion again by `privtune rollback`, which judges no gate"
            how = f"{why} (its last judgement: {last}: {tags.get('promotion.reason', '')})"
        else:  # the alias was set by hand (MLflow's UI, the client): no gate judged it
            why = "set by hand, not judged by the gates"
            how = f"{why} (`privtune promote --version {champion.version}` judges it)"
        head = (
            f"**Champion: v{champion.version} ({tags.get('method', '?')})**, {how}. "
            f"Of the {len(versions)} versions, "
            f"{len(refused)} {'was' if len(refused) == 1 else 'were'} refused and "
            f"{len(waiting)} {'is' if len(waiting) == 1 else 'are'} not yet judged."
        )
        who, summary = f"v{champion.version}", f"v{champion.version}: {why}"
    else:
        reasons = "; ".join(
            f"v{v.version} ({v.tags.get('method', '?')}): {v.tags.get('promotion.reason', '')}"
            for v in refused[:MAX_LISTED]
        )
        more = f"; and {len(refused) - MAX_LISTED} more" if len(refused) > MAX_LISTED else ""
        plural = "s" if len(versions) != 1 else ""
        head = f"**No champion.** {len(versions)} version{plural} registered"
        head += f"; {len(refused)} refused ({reasons}{more})" if refused else ""
        head += (
            f"; {len(waiting)} not yet judged: run `privtune promote` (it judges them and "
            "promotes the best that passes) or `privtune promote --version N`."
            if waiting
            else "."
        )
        who = "none"
        summary = (
            f"{len(refused)} refused, {len(waiting)} not yet judged"
            if versions
            else "nothing registered"
        )
    description = "\n\n".join([head, MODEL_POLICY])
    mlflow_client.update_registered_model(name, description=description)
    mlflow_client.set_registered_model_tag(name, "champion", who)
    mlflow_client.set_registered_model_tag(name, "champion.why", summary[:MAX_TAG_TEXT])


def _version_or_error(
    mlflow_client: Any,
    name: str,
    version: str,
) -> Any:  # pragma: no mutate block
    """The registered version, or an error naming it and the versions there are."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version(name, version)
    except MlflowException:
        found = sorted(
            int(v.version) for v in mlflow_client.search_model_versions(f"name = '{name}'")
        )
        listing = ", ".join(map(str, found)) or "none: run `dvc repro register` first"
        raise ModelError(
            "--version", f"{name} has no version {version}", f"use one of: {listing}"
        ) from None


def pair_candidates(
    name: str,
    gates: Gates | None = None,
    *,
    root: str | Path = ".",
    version: str | None = None,
    best: bool = False,
    params: Params | None = None,
) -> dict[str, Any]:
    """Compare with the champion on the same records (registry/paired.py) the candidates
    `promote` (`version`, else the challenger) or `promote_best` (``best``: the versions not
    judged yet) will judge: by their registered per-record scores, or measured side by side
    where their test data differ or those scores are missing. It runs before the registry
    lock (it can take minutes on a large model); a champion that changes meanwhile is compared
    again under the lock from the registered scores (`_compared`), and a candidate that needs
    measuring against it is left not comparable until `privtune promote --version N`."""
    gates = gates or Gates()
    require_utility_metric(name, gates, root)  # before minutes of measuring
    if version is not None:
        versions = [version]
    else:
        versions = _candidates(name, root) if best else _challenger(name, root)
    mlflow_client = client(root)
    champion = alias_version(mlflow_client, name, CHAMPION)
    promoting = stopped_promotion(name, root=root)
    if promoting is not None:  # the champion once that promotion is finished (first thing)
        champion = mlflow_client.get_model_version(name, promoting)
    # the champion is no candidate
    versions = [v for v in versions if champion is None or v != str(champion.version)]
    return pair_with_champion(name, versions, champion, gates, Path(root), params)


def _compared(
    name: str, versions: list[str], champion: Any | None, gates: Gates, root: str | Path
) -> dict[str, dict[str, str]]:
    """The versions' tags, with their comparison against the champion of now, under the
    lock: `pair_candidates` ran before it, and the champion may have moved since (another
    promotion); their registered per-record scores are compared again in milliseconds, but no
    model is measured while the registry is held."""
    mlflow_client = client(root)
    tags = {v: dict(mlflow_client.get_model_version(name, v).tags) for v in versions}
    fresh = pair_with_champion(name, versions, champion, gates, Path(root), measuring=False)
    for version, paired in fresh.items():
        tags[version][PAIRED_TAG] = paired.to_tag()
    return tags


def _challenger(name: str, root: str | Path) -> list[str]:
    challenger = alias_version(client(root), name, CHALLENGER)
    return [str(challenger.version)] if challenger is not None else []


def _candidates(name: str, root: str | Path) -> list[str]:
    """What `promote_best` judges: the versions not judged yet, else the challenger."""
    return pending_versions(name, root=root) or _challenger(name, root)


def version_method(name: str, version: str, *, root: str | Path = ".") -> str:
    """The method a version was trained with (its tag), for the gates table."""
    return dict(client(root).get_model_version(name, version).tags).get("method", "?")


def nothing_to_promote(name: str, *, root: str | Path = ".") -> str | None:
    """Why `promote_best` has nothing to judge although versions are registered (every one was
    judged, and the challenger was promoted): an outcome, not an error. None when it has
    candidates, or when nothing is registered (its error then says to register one)."""
    mlflow_client = client(root)
    found = mlflow_client.search_model_versions(f"name = '{name}'")
    if not found or _candidates(name, root) or stopped_promotion(name, root=root):
        return None
    champion = alias_version(mlflow_client, name, CHAMPION)
    held = f"champion v{champion.version}" if champion is not None else "no champion"
    return (
        f"nothing new to judge: all {len(found)} versions of {name} were judged ({held}); "
        "a new model is judged once registered (`dvc repro` after a change), and "
        "`privtune promote --version N` judges one again"
    )


# Utility metrics the evaluate stage writes (any task); a version that could not measure one
# is refused by the gate ("missing"), but a name outside these that no version has is a typo.
KNOWN_UTILITY = (*UTILITY_FIELDS, "downstream_accuracy", "cloze_accuracy")


def require_utility_metric(name: str, gates: Gates, root: str | Path = ".") -> None:
    """The utility gate's metric is one privtune measures or the registered versions carry: a
    name that is neither (a typo, `test_perplexityy`) would refuse every version for good
    ("missing: cannot check"), so it is bad input before anything is judged (exit 2)."""
    versions = client(root).search_model_versions(f"name = '{name}'")
    have = {
        k.removeprefix(UTILITY_PREFIX)
        for v in versions
        for k in v.tags
        if k.startswith(UTILITY_PREFIX)
    }
    known = have | set(KNOWN_UTILITY)
    if versions and gates.utility_metric not in known:
        raise ConfigError(
            "registry.gates.utility_metric",
            f"no registered version of {name} carries `{gates.utility_metric}` (a typo?)",
            f"use one they carry or privtune's own: {', '.join(sorted(known))} (another metric "
            "of your evaluate stage: register the versions again, `dvc repro register`)",
        )


def promote(
    name: str,
    gates: Gates | None = None,
    *,
    root: str | Path = ".",
    version: str | None = None,
    params: Params | None = None,
) -> Decision:
    """Move `champion` to the challenger (or `version`) only if every gate holds; one promotion
    at a time per store (registry/lock.py). `params` (default: the project's params.yaml) says
    how to evaluate, where the champion must be measured again (registry/paired.py)."""
    gates = gates or Gates()
    pair_candidates(name, gates, root=root, version=version, params=params)
    with registry_lock(root):
        return _promote(name, gates, root=root, version=version)


def _promote(
    name: str, gates: Gates | None = None, *, root: str | Path = ".", version: str | None = None
) -> Decision:
    gates = gates or Gates()
    mlflow_client = client(root)
    stopped = _finish_stopped(mlflow_client, name, gates, root)
    finished = stopped.decision if stopped is not None else None
    candidate = (
        _version_or_error(mlflow_client, name, version)
        if version is not None
        else alias_version(mlflow_client, name, CHALLENGER)
    )
    if finished is not None and (candidate is None or str(candidate.version) == finished.version):
        return finished  # what the stopped run was asked for (its challenger is champion now)
    if candidate is None:
        raise ModelError(
            f"{name}@{CHALLENGER}", "no challenger to promote", "register a model first"
        )
    champion = alias_version(mlflow_client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(candidate.version):
        # a promotion stopped (SIGTERM) after the alias moved left the model's page naming
        # the one before: the rerun its message asks for rewrites it
        describe_registered_model(mlflow_client, name)
        raise ModelError(
            f"{name} v{candidate.version}", "already the champion", "register a new challenger"
        )
    tags = _compared(name, [str(candidate.version)], champion, gates, root)
    results = evaluate_gates(gates, tags[str(candidate.version)], champion)
    promoted = all(g.passed for g in results)
    decision = Decision(
        name,
        str(candidate.version),
        promoted,
        str(champion.version) if champion else None,
        tuple(results),
    )
    if promoted:
        # The decision is written down before the registry changes, and cleared once the
        # registry shows it: a run stopped anywhere between leaves it for the next promote or
        # rollback to finish (`_finish_stopped`).
        intent = _promoting(decision, _history(mlflow_client, name))
        mlflow_client.set_registered_model_tag(name, PROMOTING_TAG, intent)
        _apply(mlflow_client, decision, gates, tracking_uri(root))
    else:
        _record(mlflow_client, decision, gates, tracking_uri(root))
        describe_registered_model(mlflow_client, name)
    return decision


MAX_MODEL_TAG = 5000  # characters: MLflow's SQL stores' column (PostgreSQL enforces it)


def _promoting(decision: Decision, history: list[str]) -> str:
    """`PROMOTING_TAG`'s JSON: the decision (whole, or with its gates' reasons shortened until
    it fits a tag: a promotion finished late then shows them shortened) and the champion
    history before it (what a promotion that cannot be finished is undone to)."""
    text, keep, shown = "", MAX_TAG_TEXT, decision
    while not text or (len(text) > MAX_MODEL_TAG and keep):
        text = json.dumps({"decision": asdict(shown), "history": history})
        gates = tuple(replace(g, reason=g.reason[:keep]) for g in decision.gates)
        shown, keep = replace(decision, gates=gates), keep // 2
    return text


def _read_promoting(raw: str) -> tuple[Decision, list[str]] | None:
    """What `_promoting` wrote, or None where it cannot be read (edited by hand)."""
    try:
        fields = json.loads(raw)
        decision = Decision.from_dict(fields["decision"])
        return decision, [str(v) for v in fields["history"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _apply(mlflow_client: Any, decision: Decision, gates: Gates, uri: str) -> None:
    """Make a promotion the registry's state: history, aliases, the version's verdict and
    both pages, then clear `PROMOTING_TAG`. Every step may run again (a stopped promotion is
    finished by running all of them): the history gains the version once."""
    name, version = decision.name, decision.version
    history = _history(mlflow_client, name)
    if history[-1:] != [version]:
        history.append(version)
        mlflow_client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    if decision.champion_before is not None:
        mlflow_client.set_registered_model_alias(name, PREVIOUS, decision.champion_before)
    if ROLLED_BACK_TAG in mlflow_client.get_model_version(name, version).tags:
        # judged and promoted again: no longer so
        mlflow_client.delete_model_version_tag(name, version, ROLLED_BACK_TAG)
    challenger = alias_version(mlflow_client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        mlflow_client.delete_registered_model_alias(name, CHALLENGER)
    _record(mlflow_client, decision, gates, uri)
    describe_registered_model(mlflow_client, name)
    mlflow_client.delete_registered_model_tag(name, PROMOTING_TAG)


def stopped_promotion(name: str, *, root: str | Path = ".") -> str | None:
    """The version a stopped promotion was making champion, which the next promote or
    rollback finishes: None when none was stopped, or its record cannot be finished (read or
    its version found: the next promote or rollback forgets it)."""
    mlflow_client = client(root)
    version = _promoting_now(mlflow_client, name)
    return version if _exists(mlflow_client, name, version) else None


def _promoting_record(mlflow_client: Any, name: str) -> str | None:
    """`PROMOTING_TAG` as stored (None: no promotion in progress, or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_registered_model(name).tags.get(PROMOTING_TAG)
    except MlflowException:  # no such model: nothing was promoted
        return None


def _promoting_now(mlflow_client: Any, name: str) -> str | None:
    """The version a promotion in progress (or stopped) is making champion, if readable."""
    raw = _promoting_record(mlflow_client, name)
    read = None if raw is None else _read_promoting(raw)
    return None if read is None else read[0].version


def _exists(mlflow_client: Any, name: str, version: str | None) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return version is not None and mlflow_client.get_model_version(name, version) is not None
    except MlflowException:
        return False


@dataclass(frozen=True)
class Finished:
    """What became of a promotion a run decided but stopped applying."""

    decision: Decision | None  # applied now (None: forgotten, see ``note``)
    note: str


def _finish_stopped(
    mlflow_client: Any, name: str, gates: Gates, root: str | Path
) -> Finished | None:
    """Finish a promotion a run decided but stopped applying (under the registry lock, as
    every promotion): the gates passed then, so it is applied, not judged again. Forgotten,
    its history entry undone, when it cannot be: its record unreadable, its version deleted,
    or `champion` moved by hand since to a third version (the hand's choice stands). Says
    which, as a notice (the CLI's stderr, a flow's log). None: nothing was stopped."""
    from privtune.progress import notice

    raw = _promoting_record(mlflow_client, name)  # no such model: the caller's error says so
    if raw is None:
        return None
    read = _read_promoting(raw)
    champion = alias_version(mlflow_client, name, CHAMPION)
    held = None if champion is None else str(champion.version)
    why = None
    if read is None:
        why = f"its record ({PROMOTING_TAG}) cannot be read"
    else:
        decision, before = read
        if not _exists(mlflow_client, name, decision.champion_before):
            # deleted since (its aliases with it): no previous alias, and no champion is
            # what the stopped run left if it stopped before the alias moved
            decision = replace(decision, champion_before=None)
        if not _exists(mlflow_client, name, decision.version):
            why = f"v{decision.version} was deleted since"
        elif held not in (decision.version, decision.champion_before):
            moved = f"moved by hand since, to v{held}" if held else "removed by hand since"
            why = f"`champion` was {moved}"
    if why is None:
        decision = replace(decision, finished_late=True)
        _apply(mlflow_client, decision, gates, tracking_uri(root))
        note = (
            f"finished the promotion of v{decision.version} to champion that a run decided "
            "and stopped before the registry showed it"
        )
        notice(note)
        return Finished(decision, note)
    if read is not None and _history(mlflow_client, name) == [*before, decision.version]:
        mlflow_client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(before))
    mlflow_client.delete_registered_model_tag(name, PROMOTING_TAG)
    what = f"of v{read[0].version} " if read is not None else ""
    note = f"forgot a promotion {what}that a run decided and stopped: {why}"
    notice(note)
    return Finished(None, note)


@dataclass(frozen=True)
class Selection:
    """A `privtune promote` over several candidates: which one was chosen, and why."""

    chosen: str | None  # the version promoted (None: no candidate was eligible)
    why: str
    decisions: tuple[Decision, ...]  # every candidate's, the chosen one first
    methods: dict[str, str]  # version -> method, for the table

    def to_dict(self) -> dict[str, Any]:  # pragma: no mutate block
        return {
            "chosen": self.chosen,
            "why": self.why,
            "decisions": [d.to_dict() for d in self.decisions],
        }


def _utility_value(gates: Gates, tags: dict[str, str]) -> float | None:
    return _number(tags, f"{UTILITY_PREFIX}{gates.utility_metric}")


def promote_best(
    name: str,
    gates: Gates | None = None,
    *,
    root: str | Path = ".",
    params: Params | None = None,
) -> Selection:
    """Promote the best eligible candidate: of the versions no promotion has judged yet (or
    the challenger, when every version was judged), those that pass every gate against the
    current champion, the one with the best utility. The others are judged too and refused
    (a candidate that passed its gates is refused as not chosen, naming the better one), so
    the champion history gains one entry, not one per candidate."""
    gates = gates or Gates()
    pair_candidates(name, gates, root=root, best=True, params=params)
    with registry_lock(root):
        return _promote_best(name, gates, root=root)


def _promote_best(name: str, gates: Gates | None = None, *, root: str | Path = ".") -> Selection:
    gates = gates or Gates()
    mlflow_client = client(root)
    stopped = _finish_stopped(mlflow_client, name, gates, root)
    finished = stopped.decision if stopped is not None else None
    candidates = _candidates(name, root)
    if stopped is not None and not candidates:  # finished (or forgotten) it: all there was
        chosen = None if finished is None else finished.version
        done = () if finished is None else (finished,)
        methods = {} if chosen is None else {chosen: version_method(name, chosen, root=root)}
        return Selection(chosen, stopped.note, done, methods)
    if not candidates:
        raise ModelError(
            f"{name}@{CHALLENGER}", "no challenger to promote", "register a model first"
        )
    champion = alias_version(mlflow_client, name, CHAMPION)
    candidates = [v for v in candidates if champion is None or v != str(champion.version)]
    tags = _compared(name, candidates, champion, gates, root)
    eligible = [
        v for v in candidates if all(g.passed for g in evaluate_gates(gates, tags[v], champion))
    ]
    # Utilities compare only on one test set: eligible versions of older data (a run never
    # judged before a retrain on change) give way to those of the newest eligible one's.
    newest = tags[eligible[-1]].get(EVALUATED_ON_TAG) if eligible else None
    pool = [v for v in eligible if tags[v].get(EVALUATED_ON_TAG) in (newest, None) or not newest]
    sign = -1.0 if gates.higher_is_better else 1.0
    # ties go to the older version (candidates are oldest first)
    best = min(pool, key=lambda v: sign * _utility_value(gates, tags[v])) if pool else None
    decisions: list[Decision] = []
    if best is not None:
        decisions.append(_promote(name, gates, root=root, version=best))
        champion = alias_version(mlflow_client, name, CHAMPION)
        # the others are judged against the new champion
        tags |= _compared(name, [v for v in candidates if v != best], champion, gates, root)
    for version in candidates:
        if version == best:
            continue
        results = evaluate_gates(gates, tags[version], champion)
        if best is not None and all(g.passed for g in results):
            value = _utility_value(gates, tags[best])
            reason = f"v{best} was chosen: better {gates.utility_metric} ({value:.6g})"
            results.append(GateResult("best_candidate", False, None, None, None, reason))
        decision = Decision(
            name,
            version,
            False,
            str(champion.version) if champion else None,
            tuple(results),
        )
        _record(mlflow_client, decision, gates, tracking_uri(root))
        decisions.append(decision)
    describe_registered_model(mlflow_client, name)
    if best is None:
        why = f"none of {len(candidates)} candidate(s) passes every gate"
    else:
        value = _utility_value(gates, tags[best])
        direction = "highest" if gates.higher_is_better else "lowest"
        why = (
            f"v{best} has the {direction} {gates.utility_metric} ({value:.6g}) of the "
            f"{len(eligible)} eligible candidate(s) out of {len(candidates)}"
        )
        if len(pool) < len(eligible):
            why += (
                f", among the {len(pool)} measured on the newest test data ({EVALUATED_ON_TAG} "
                f"{newest}; the others' utility does not compare with theirs)"
            )
    methods = {v: tags[v].get("method", "?") for v in candidates}
    if stopped is not None:  # said first: it happened first
        why = f"{stopped.note}; then {why}"
    if finished is not None:  # promoted by this run too, before the candidates were judged
        decisions.insert(1 if best is not None else 0, finished)
        methods[finished.version] = version_method(name, finished.version, root=root)
        best = best or finished.version
    return Selection(best, why, tuple(decisions), methods)


GATE_COLUMNS = ("epsilon", "delta", "noise", "mia_auc", "mia_tpr_at_fpr_0.01", "audit", "utility")
# One precision a column, so a column's values line up and compare (ε 7.990, 7.975, 8.000;
# `.4g` gave 7.99, 7.975 and 8); --json has the full values.
GATE_FORMATS = {
    "epsilon": "{:.3f}",
    "delta": "{:.2e}",
    "mia_auc": "{:.4f}",
    "mia_tpr_at_fpr_0.01": "{:.4f}",
    "audit": "{:.3f}",
}


def gates_table(
    decisions: Sequence[Decision],
    methods: dict[str, str] | None = None,
) -> str:  # pragma: no mutate block
    """Candidates x gates as aligned text: each gate's value, `!` where it failed."""
    header = ["version", "method", *GATE_COLUMNS, "decision"]
    rows = [header]
    for d in decisions:
        by_gate = {g.gate: g for g in d.gates}
        cells = [f"v{d.version}", (methods or {}).get(d.version, "")]
        for gate in GATE_COLUMNS:
            g = by_gate.get(gate)
            if g is None:
                cells.append("")
            else:
                shown = GATE_FORMATS.get(gate, "{:.4g}")
                value = "–" if g.value is None else shown.format(g.value)
                value = (g.evidence or value) if gate == "noise" else value  # secret, seeded
                if g.passed:  # `~`: above the gate, within its sampling noise (passes)
                    cells.append(f"{value}~" if g.evidence == INCONCLUSIVE else value)
                else:
                    cells.append(f"{value}{'?' if g.evidence == INSUFFICIENT else '!'}")
        not_chosen = "best_candidate" in by_gate
        cells.append("PROMOTED" if d.promoted else "not chosen" if not_chosen else "refused")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if any(g.evidence == INSUFFICIENT for d in decisions for g in d.gates):
        lines.append(f"(`?`: {INSUFFICIENT} to decide the gate, so it is refused; --json says why)")
    if any(g.evidence == INCONCLUSIVE for d in decisions for g in d.gates):
        lines.append(
            f"(`~`: {INCONCLUSIVE}: above the gate, but its lower confidence bound is not, so it "
            "passes; more members would tell)"
        )
    return "\n".join(lines)


def pending_versions(name: str, *, root: str | Path = ".") -> list[str]:
    """Versions of `name` no promotion has judged yet (oldest first): a run's new challengers,
    and versions whose last promotion could not measure their utility (to judge again)."""
    found = client(root).search_model_versions(f"name = '{name}'")
    return sorted((str(v.version) for v in found if _waiting(dict(v.tags))), key=int)


def _waiting(tags: dict[str, str]) -> bool:
    """Not judged yet: never, or only refused because measuring its utility failed."""
    return tags.get("promotion.decision", UNJUDGED) == UNJUDGED


def _attempts(tags: dict[str, str]) -> int:
    """Promotions whose measurement failed on this version, in a row."""
    try:
        return int(tags.get(ATTEMPTS_TAG, "0"))
    except ValueError:
        return 0


@dataclass(frozen=True)
class Rollback:
    name: str
    from_version: str
    to_version: str
    # Said when the restored champion's noise was seeded from finetune.seed, or a promotion
    # since judged it again and refused it (a rollback is the way back in an emergency, so
    # it judges no gate; it says what it restored).
    warning: str | None = None


# Opens a rolled-back version's description: a second rollback of it replaces that line.
ROLLED_BACK = "**ROLLED BACK**"
ROLLED_BACK_TAG = "promotion.rolled_back"  # when; removed if the version is promoted again


def rollback(name: str, *, root: str | Path = ".", gates: Gates | None = None) -> Rollback:
    """Give `champion` back to the previous champion (the history tag on the registered model).
    ``gates``: the project's, for the page of a stopped promotion it finishes first."""
    with registry_lock(root):
        return _rollback(name, root=root, gates=gates)


def _rollback(name: str, *, root: str | Path = ".", gates: Gates | None = None) -> Rollback:
    mlflow_client = client(root)
    # a promotion stopped midway is finished first: the rollback then undoes all of it
    _finish_stopped(mlflow_client, name, gates or Gates(), root)
    registered = {str(v.version) for v in mlflow_client.search_model_versions(f"name = '{name}'")}
    # a deleted version cannot be returned to
    history = [v for v in _history(mlflow_client, name) if v in registered]
    champion = alias_version(mlflow_client, name, CHAMPION)
    held = None if champion is None else str(champion.version)
    if held is not None and history and held != history[-1]:
        if held in history:
            # given back by hand (MLflow's UI) to an earlier champion: the rollback records
            # it, and the champions after that one leave the history as if rolled back here
            cut = len(history) - history[::-1].index(held)
            demoted, history = history[cut:], history[:cut]
            mlflow_client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
            return _give_back(mlflow_client, name, demoted, history, how="recorded")
        # moved by hand to a version no promotion chose: rolled back to the last champion the
        # gates chose, whose turn stays
        return _give_back(mlflow_client, name, [held], history, how="by hand")
    if len(history) < 2:
        # history holds the champions still to return to: rolled-back ones are gone from it
        earlier = f"no champion came before v{history[-1]}" if history else "none yet"
        raise ModelError(
            f"{name} {HISTORY_TAG}",
            f"no previous champion to roll back to ({earlier})",
            "a rollback needs two promotions: promote another version first",
        )
    demoted = history[-1]
    # every turn of the demoted version goes (promoted twice, it is not returned to by the
    # next rollback either), and what is left holds no version twice in a row
    rest = [v for v in history if v != demoted]
    history = [v for i, v in enumerate(rest) if i == 0 or rest[i - 1] != v]
    if not history:
        raise ModelError(
            f"{name} {HISTORY_TAG}",
            f"no previous champion to roll back to (v{demoted} was every champion so far)",
            "a rollback needs two promotions: promote another version first",
        )
    mlflow_client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    return _give_back(mlflow_client, name, [demoted], history)


def _give_back(
    mlflow_client: Any,
    name: str,
    demoted: list[str],
    history: list[str],
    *,
    how: str = "rollback",
) -> Rollback:
    """`champion` to the last of ``history`` (the history tag as it now stands), each of
    ``demoted`` marked rolled back on its page. ``how``: "rollback", "by hand" (the demoted
    version held the alias without a promotion) or "recorded" (the alias was given back by
    hand; the rollback records it)."""
    restored = history[-1]
    mlflow_client.set_registered_model_alias(name, CHAMPION, restored)
    if len(history) >= 2:
        mlflow_client.set_registered_model_alias(name, PREVIOUS, history[-2])
    elif alias_version(mlflow_client, name, PREVIOUS) is not None:
        mlflow_client.delete_registered_model_alias(name, PREVIOUS)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    line = {
        "rollback": f"`champion` was given back to v{restored} (`privtune rollback`); the "
        "promotion recorded below no longer holds.",
        "by hand": f"`champion`, set on this version by hand, was given back to v{restored}, "
        "the last champion the gates chose (`privtune rollback`).",
        "recorded": f"`champion` was given back to v{restored} by hand, which `privtune "
        "rollback` recorded; the promotion recorded below no longer holds.",
    }[how]
    for version in dict.fromkeys(demoted):
        mlflow_client.set_model_version_tag(name, version, ROLLED_BACK_TAG, now)
        # its description opened with "PROMOTED to champion": the page now says it is no
        # longer (the gates' decision below it stays the record of that promotion)
        description = mlflow_client.get_model_version(name, version).description or ""
        if description.startswith(ROLLED_BACK):
            description = description.partition("\n\n")[2]
        text = f"{ROLLED_BACK} {now}: {line}\n\n{description}"
        mlflow_client.update_model_version(name, version, description=text)
    describe_registered_model(mlflow_client, name)
    tags = dict(mlflow_client.get_model_version(name, restored).tags)
    noise = _noise(Gates(), tags)
    warnings = [] if noise.passed else [f"v{restored}: {noise.reason}"]
    if tags.get("promotion.decision", "promoted") != "promoted":  # judged again since
        reason = tags.get("promotion.reason", "")
        warnings.append(f"v{restored}'s last judgement was {tags['promotion.decision']}: {reason}")
    return Rollback(name, demoted[-1], restored, "; ".join(warnings) or None)
