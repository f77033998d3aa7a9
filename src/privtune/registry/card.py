"""The privacy model card: everything a reviewer needs to judge one registered model.

Built from the stages' own files (models/<entry>/finetune.json and ledger.json, metrics/,
the data card), never from record text. It is written as JSON (for tools and tests) and
markdown (for people), ships inside the pyfunc model and sits at the root of the version's
model artifacts. `verdict_line` and `gate_report` give the one-line verdict and the gate table
that open each version's description.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privtune import io
from privtune.config import METRICS_DIR, MODELS_DIR, PREPARED_DIR, Gates

if TYPE_CHECKING:
    from privtune.registry.promotion import Decision, GateResult

CARD_SCHEMA = "privtune.model_card/1"
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
CARD_ARTIFACT = "model_card"  # name of the card's directory among the pyfunc's artifacts
SCORES = ("loss", "reference", "zlib", "min_k")  # attacks.scoring.SCORE_NAMES, report order
# exposure_r16_mean; exposure_calibrated_r16_mean (against the base model: attacks/exposure.py)
_EXPOSURE = re.compile(r"exposure_(calibrated_)?(r\d+|held_out)_(mean|max)")
_EXTRACTION = re.compile(r"extraction_(greedy|sampled)_(r\d+|held_out)")


def _finite(value: Any) -> float | None:
    """JSON has no infinity: an unbounded or missing number is null."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def ledger_summary(path: Path) -> dict[str, Any] | None:
    """What the ledger says about the noise, without its per-step batch sizes (the size of a
    Poisson batch is itself a function of the data)."""
    if not path.is_file():
        return None
    entries = io.read_json(path)["entries"]
    if not entries:
        return {"steps": 0}
    z = [e["noise_multiplier"] for e in entries]
    clips = [c for e in entries for c in e["clip_thresholds"]]
    rates = [e["sample_rate"] for e in entries]
    mechanisms: dict[str, int] = {}
    for e in entries:
        kind = e.get("mechanism", "gaussian")
        mechanisms[kind] = mechanisms.get(kind, 0) + 1
    segments = 1 + sum(1 for a, b in zip(z, z[1:], strict=False) if a != b)
    return {
        "steps": len(entries),
        "mechanisms": mechanisms,
        "noise_segments": segments,
        "noise_multiplier": {"first": z[0], "last": z[-1], "min": min(z), "max": max(z)},
        "clip_threshold": {"min": min(clips), "max": max(clips)} if clips else None,
        "sample_rate": {"min": min(rates), "max": max(rates)},
        "released_counts": any(e.get("count_noise_std") is not None for e in entries),
    }


def _membership(attack: Mapping[str, float], counts: tuple[int, int] | None) -> dict[str, Any]:
    scores = {}
    for name in SCORES:
        if f"mia_{name}_auc" not in attack:
            continue
        scores[name] = {
            "auc": attack[f"mia_{name}_auc"],
            "auc_ci_low": attack.get(f"mia_{name}_auc_ci_low"),
            "auc_ci_high": attack.get(f"mia_{name}_auc_ci_high"),
            "tpr_at_fpr_0.001": attack.get(f"mia_{name}_tpr_at_fpr_0.001"),
            "tpr_at_fpr_0.01": attack.get(f"mia_{name}_tpr_at_fpr_0.01"),
        }
    members = attack.get("mia_members", counts[0] if counts else None)
    non_members = attack.get("mia_non_members", counts[1] if counts else None)
    patients = [attack.get(f"mia_{side}_patients") for side in ("member", "non_member")]
    return {
        "members": None if members is None else int(members),
        "non_members": None if non_members is None else int(non_members),
        # with a patient column: the patients the intervals resampled (None: notes)
        "patients": None if None in patients else [int(n) for n in patients],
        "best_auc": attack.get("mia_auc_max"),
        "best_tpr_at_fpr_0.01": attack.get("mia_tpr_at_fpr_0.01_max"),
        "scores": scores,
    }


def _canaries(attack: Mapping[str, float], data_card: Mapping[str, Any]) -> dict[str, Any]:
    exposure: dict[str, dict[str, float]] = {}
    extraction: dict[str, dict[str, float]] = {}
    for key, value in attack.items():
        if found := _EXPOSURE.fullmatch(key):
            exposure.setdefault(found[2], {})[f"{found[1] or ''}{found[3]}"] = value
        elif found := _EXTRACTION.fullmatch(key):
            extraction.setdefault(found[2], {})[found[1]] = value
    planted = data_card.get("canaries", {})
    return {
        "planted": planted.get("planted"),
        "repetitions": planted.get("repetitions"),
        "held_out": planted.get("held_out"),
        # occurrences within base.max_length: those past it were never trained on
        "occurrences_planted": _finite(attack.get("canary_occurrences_planted")),
        "occurrences_trained": _finite(attack.get("canary_occurrences_trained")),
        "exposure_bits": exposure,
        "extraction_rate": extraction,
    }


def _audit(attack: Mapping[str, float], confidence: float | None) -> dict[str, Any] | None:
    if "audit_epsilon_lower_bound" not in attack:
        return None
    audit: dict[str, Any] = {
        "epsilon_lower_bound": attack["audit_epsilon_lower_bound"],
        "confidence": confidence,
        "claimed_epsilon": _finite(attack.get("claimed_epsilon")),
    }
    for kind in ("whitebox", "blackbox"):
        if f"audit_{kind}_m" in attack:
            audit[kind] = {
                field: attack[f"audit_{kind}_{field}"]
                for field in ("m", "guesses", "correct", "epsilon_lower_bound")
                if f"audit_{kind}_{field}" in attack
            }
    return audit


def build_card(
    root: Path,
    entry: str,
    *,
    gates: Gates,
    gate_results: Sequence[GateResult],
    provenance: Mapping[str, str],
    confidence: float | None = None,
    membership_counts: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The card of models/<entry> from its stages' files. ``gate_results`` are the gates that
    do not depend on the champion, judged at registration; ``membership_counts`` (members,
    non-members) stand in for an attack metrics file that predates recording them."""
    model_dir = root / MODELS_DIR / entry
    info = io.read_json(model_dir / "finetune.json")
    metrics = info.get("metrics", {})
    plan = info.get("plan", {})
    attack = io.read_numbers(root / METRICS_DIR / f"attack-{entry}.json")
    evaluation = io.read_numbers(root / METRICS_DIR / f"evaluate-{entry}.json")
    data_card_path = root / PREPARED_DIR / "data_card.json"
    data_card = io.read_json(data_card_path) if data_card_path.is_file() else {}
    private = bool(metrics.get("private", "epsilon" in metrics))
    finetune = info.get("finetune", {})
    return {
        "schema": CARD_SCHEMA,
        "model": {
            "entry": entry,
            "method": info.get("method"),
            "options": info.get("options", {}),
            "lora": finetune.get("lora"),
            **provenance,
        },
        "contract": {
            "private": private,
            "unit_of_privacy": "one record (one note)",
            "target_epsilon": metrics.get("target_epsilon"),
            "epsilon": _finite(metrics.get("epsilon")) if private else None,
            "epsilon_rdp_looser_bound": metrics.get("epsilon_rdp"),
            "delta": metrics.get("delta"),
            "accountant": metrics.get("accountant"),
            "mechanism": metrics.get("mechanism"),
            "sample_rate": metrics.get("sample_rate"),
            "steps": metrics.get("steps"),
            "planned_steps": plan.get("steps"),
            "stopped_by_guard": metrics.get("stopped_by_guard"),
            # null: not private (no noise), or trained before secret seeds existed (seeded)
            "secret_noise": finetune.get("secret_noise") if private else None,
            # with prepare.group_column: what a patient with the most training records gets
            "per_group": _per_group(data_card, metrics) if private else None,
        },
        "data": {
            "content_sha256": data_card.get("content_sha256"),
            "source": data_card.get("source"),
            "split_records": data_card.get("counts"),
            "training_records": plan.get("n_records"),
            # md5 of the train and valid splits (DVC's cache keys): a later promotion keeps
            # what this model trained or validated on out of a side-by-side comparison
            "split_md5": _split_md5(root),
            "audit_gradient_canaries": finetune.get("audit_canaries"),
        },
        "ledger": ledger_summary(model_dir / "ledger.json"),
        "utility": {"valid_perplexity": metrics.get("valid_perplexity")}
        | {k: v for k, v in evaluation.items() if k != "epsilon"},
        "attacks": {
            "membership": _membership(attack, membership_counts),
            "canaries": _canaries(attack, data_card),
        },
        "audit": _audit(attack, confidence),
        "gates": {
            "policy": gates.model_dump(),
            "at_registration": [asdict(g) for g in gate_results],
            "utility": "judged at promotion, against the champion of that time",
        },
    }


def _per_group(data_card: Mapping[str, Any], metrics: Mapping[str, Any]) -> Any:
    from privtune.privacy.group import per_group

    epsilon, delta = _finite(metrics.get("epsilon")), metrics.get("delta")
    if epsilon is None or delta is None:
        return None
    return per_group(data_card.get("groups"), float(epsilon), float(delta))


def _split_md5(root: Path) -> dict[str, str]:
    splits = {name: root / PREPARED_DIR / f"{name}.jsonl" for name in ("train", "valid")}
    return {name: io.file_md5(path) for name, path in splits.items() if path.is_file()}


def card_from_tags(tags: Mapping[str, str]) -> dict[str, Any]:
    """The headline a version's tags carry, shaped like a card (no schema): for versions
    registered before cards existed, so their verdict line can still be written."""

    def number(key: str) -> float | None:
        try:
            return float(tags[key])
        except (KeyError, ValueError):
            return None

    epsilon = number("epsilon")
    private = epsilon is not None and math.isfinite(epsilon)
    audit = number("attack.audit_epsilon_lower_bound")
    return {
        "schema": None,
        "model": {"entry": tags.get("entry", tags.get("method")), "method": tags.get("method")},
        "contract": {
            "private": private,
            "epsilon": epsilon if private else None,
            "target_epsilon": number("target_epsilon"),
            "delta": number("delta"),
            "accountant": tags.get("accountant"),
            "secret_noise": {"true": True, "false": False}.get(tags.get("secret_noise", "")),
        },
        "utility": {
            k.removeprefix("utility."): number(k) for k in tags if k.startswith("utility.")
        },
        "attacks": {
            "membership": {
                "members": None,
                "non_members": None,
                "best_auc": number("attack.mia_auc_max"),
                "best_tpr_at_fpr_0.01": number("attack.mia_tpr_at_fpr_0.01_max"),
                "scores": {},
            }
        },
        "audit": None if audit is None else {"epsilon_lower_bound": audit, "confidence": None},
    }


# -- text ------------------------------------------------------------------------------------


def _g(value: Any, fmt: str = "{:.3g}") -> str:
    return "–" if value is None else fmt.format(value)


def _epsilon(card: Mapping[str, Any]) -> str:
    c = card["contract"]
    if not c["private"]:
        return "ε ∞ (not private)"
    accountant = f" ({c['accountant'].upper()})" if c.get("accountant") else ""
    # as the card's contract prints them (ε to 4 decimals: 7.9999 read 8.000 at 3; δ to 3
    # significant digits)
    return f"ε {_g(c['epsilon'], '{:.4f}')} / {_g(c['target_epsilon'], '{:g}')}{accountant}"


def _membership_text(card: Mapping[str, Any]) -> str:
    m = card["attacks"]["membership"]
    if m["best_auc"] is None:
        return "MIA not run"
    counts = (
        f"{m['members']} members vs {m['non_members']} non-members"
        if m["members"] is not None
        else "record counts not recorded"
    )
    if m.get("patients"):  # cards of versions registered before patients were counted lack it
        counts += " (of {} and {} patients, resampled by patient)".format(*m["patients"])
    scores = f"best of {len(m['scores'])} scores; " if m["scores"] else ""
    return (
        f"MIA AUC {_g(m['best_auc'])}, TPR {_g(m['best_tpr_at_fpr_0.01'], '{:.3f}')} at 1 % FPR "
        f"({scores}{counts})"
    )


def _audit_text(card: Mapping[str, Any]) -> str:
    audit = card["audit"]
    if audit is None:
        return "no audit"
    parts = []
    for kind, label in (("whitebox", "white-box"), ("blackbox", "black-box")):
        if kind in audit and "m" in audit[kind]:
            parts.append(f"{label} {int(audit[kind]['m'])}")
    confidence = f"{audit['confidence']:.0%}, " if audit.get("confidence") else ""
    canaries = f" ({confidence}{' + '.join(parts)} canaries)" if parts else ""
    return f"audit ε ≥ {audit['epsilon_lower_bound']:.3f}{canaries}"


def _utility_text(card: Mapping[str, Any], gates: Gates) -> str:
    value = card["utility"].get(gates.utility_metric)
    return f"{gates.utility_metric.replace('_', ' ')} {_g(value, '{:.4g}')}"


def verdict_line(card: Mapping[str, Any], gates: Gates, decision: str) -> str:
    """One line: method, ε spent / target, δ, utility, best MIA with its counts, audit bound,
    and the promotion decision with its reason (``decision``, already worded). Plain text:
    MLflow's list of versions shows a description's first line unrendered."""
    c = card["contract"]
    parts = [
        f"{card['model']['entry']} ({card['model']['method']})",
        _epsilon(card),
        f"δ {_g(c['delta'], '{:.3g}')}",
        _utility_text(card, gates),
        _membership_text(card),
        _audit_text(card),
        decision,
    ]
    return " · ".join(parts)


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _pairs(mapping: Mapping[str, Any] | None) -> str:
    return "–" if not mapping else ", ".join(f"{k} {v}" for k, v in mapping.items())


def gate_report(decision: Decision, when: str) -> str:
    """The gate table of one promotion decision, in markdown (replaces the previous one)."""
    before = f"v{decision.champion_before}" if decision.champion_before else "none"
    lines = [
        f"**Promotion gates**, judged {when} (champion before: {before})",
        "",
        "| gate | result | value | threshold | margin | detail |",
        "|---|---|---|---|---|---|",
    ]
    for g in decision.gates:
        result = "pass" if g.passed else "**FAIL**"
        if g.evidence is not None and g.evidence != "within":
            result += f" ({g.evidence})"
        # A threshold gate's reason only repeats its numbers; the others say what they compared
        # (attack gates: the confidence bound they decided on).
        plain = (
            g.gate != "utility"
            and g.value is not None
            and g.threshold is not None
            and g.evidence is None
        )
        detail = "" if plain else g.reason.replace("|", "/")
        lines.append(
            f"| {g.gate} | {result} | {_cell(g.value)} | {_cell(g.threshold)} | "
            f"{_cell(g.margin)} | {detail} |"
        )
    return "\n".join(lines)


def card_markdown(card: Mapping[str, Any]) -> str:
    """The card for people: sections in the order a reviewer asks."""
    model, c, data = card["model"], card["contract"], card["data"]
    lines = [
        f"# Privacy model card: {model['entry']} ({model['method']})",
        "",
        "## Privacy contract",
        "",
        f"- Unit of privacy: {c['unit_of_privacy']}; "
        + ("differentially private." if c["private"] else "**not private** (no ε claimed)."),
    ]
    if c["private"]:
        lines += [
            f"- ε spent {_g(c['epsilon'], '{:.4f}')} of the target {_g(c['target_epsilon'])}, "
            f"δ {_g(c['delta'], '{:.3g}')}, by the {str(c['accountant']).upper()} accountant "
            f"(an upper bound); through RDP the same ledger gives "
            f"{_g(c['epsilon_rdp_looser_bound'], '{:.4f}')}, a looser bound.",
            f"- Mechanism {c['mechanism']}, Poisson sampling at rate "
            f"{_g(c['sample_rate'], '{:.4g}')}, "
            f"{c['steps']} of {c['planned_steps']} planned steps"
            + (" (stopped by the budget guard)." if c.get("stopped_by_guard") else "."),
            "- Sampler and noise seeded from OS entropy, kept secret."
            if c.get("secret_noise")
            else "- **Sampler and noise seeded from `finetune.seed`** (reproducible): the "
            "guarantee does not hold against anyone who knows the params.",
        ]
        if group := c.get("per_group"):  # a corpus with a patient column
            k, bound = group["max_training_records_of_one_group"], group["delta"]
            lines.append(
                f"- Per patient (`{group['column']}`): the most training records of one patient "
                f"is {k}; group privacy gives that patient "
                + (
                    f"ε {_g(group['epsilon'])}, δ {_g(bound, '{:.3g}')}."
                    if bound is not None
                    else f"no bound (ε {_g(group['epsilon'])} with δ ≥ 1)."
                )
            )
    lines += [
        "",
        "## Data",
        "",
        f"- Content hash (sha256) {data['content_sha256']}, source `{data['source']}`.",
        f"- Records per split: {_pairs(data['split_records'])}; records in training: "
        f"{data['training_records']} (with {data['audit_gradient_canaries']} white-box audit "
        "gradient canaries, each included with probability ½).",
    ]
    if data.get("split_md5"):  # cards written before they were recorded have none
        lines.append(f"- Splits it saw, md5 (DVC's cache keys): {_pairs(data['split_md5'])}.")
    lines += [
        "",
        "## Ledger",
        "",
    ]
    ledger = card["ledger"]
    if ledger is None:
        lines.append("- No ledger: the model was trained without noise.")
    else:
        z = ledger.get("noise_multiplier") or {}
        clip = ledger.get("clip_threshold") or {}
        lines.append(
            f"- {ledger['steps']} noisy steps ({_pairs(ledger.get('mechanisms'))}), "
            f"{ledger.get('noise_segments')} noise level(s): z first {_g(z.get('first'))}, "
            f"last {_g(z.get('last'))}, range [{_g(z.get('min'))}, {_g(z.get('max'))}]; "
            f"clipping thresholds [{_g(clip.get('min'))}, {_g(clip.get('max'))}]."
        )
    lines += ["", "## Utility", ""]
    lines += [f"- {k}: {_g(v, '{:.4g}')}" for k, v in card["utility"].items() if v is not None]
    m = card["attacks"]["membership"]
    lines += [
        "",
        "## Membership inference",
        "",
        f"{m['members']} members against {m['non_members']} non-members; AUC with its "
        "bootstrap interval, TPR at 0.1 % and 1 % FPR (– where fewer than 1/FPR non-members "
        "cannot measure that rate).",
        "",
        "| score | AUC | interval | TPR @ 0.1 % FPR | TPR @ 1 % FPR |",
        "|---|---|---|---|---|",
    ]
    for name, s in m["scores"].items():
        lines.append(
            f"| {name} | {_g(s['auc'])} | [{_g(s['auc_ci_low'])}, {_g(s['auc_ci_high'])}] | "
            f"{_g(s['tpr_at_fpr_0.001'])} | {_g(s['tpr_at_fpr_0.01'])} |"
        )
    canaries = card["attacks"]["canaries"]
    lines += [
        "",
        "## Canaries",
        "",
        f"{canaries['planted']} planted canaries (repeated {canaries['repetitions']} times), "
        f"{canaries['held_out']} held out. Exposure in bits (≈1.44 for a model that knows "
        "nothing; calibrated: ranked by what fine-tuning added to the base model's "
        "likelihood, not by how few tokens a secret takes) and the rate of exact extraction:",
        "",
    ]
    planted, trained = canaries.get("occurrences_planted"), canaries.get("occurrences_trained")
    if planted is not None and trained is not None and trained < planted:
        lines += [
            f"**Training saw only {trained:.0f} of the {planted:.0f} planted canary "
            "occurrences** (the others lie past `base.max_length` tokens): the exposure and "
            "extraction below understate what a model would memorise of them.",
            "",
        ]
    lines += [
        "| canaries | exposure mean | exposure max | calibrated mean | calibrated max "
        "| extraction greedy | extraction sampled |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = sorted(
        set(canaries["exposure_bits"]) | set(canaries["extraction_rate"]),
        key=lambda g: (g == "held_out", int(g[1:]) if g[1:].isdigit() else 0),
    )
    for group in groups:
        e = canaries["exposure_bits"].get(group, {})
        x = canaries["extraction_rate"].get(group, {})
        lines.append(
            f"| {group} | {_g(e.get('mean'))} | {_g(e.get('max'))} | "
            f"{_g(e.get('calibrated_mean'))} | {_g(e.get('calibrated_max'))} | "
            f"{_g(x.get('greedy'))} | {_g(x.get('sampled'))} |"
        )
    lines += ["", "## Audit", ""]
    audit = card["audit"]
    if audit is None:
        lines.append("- No audit was run.")
    else:
        lines.append(
            f"- Lower bound on ε: {audit['epsilon_lower_bound']:.4f} at "
            f"{_g(audit['confidence'], '{:.0%}')} confidence (the larger of the audits), "
            f"against the claimed ε {_g(audit['claimed_epsilon'], '{:.4f}')}."
        )
        for kind in ("whitebox", "blackbox"):
            if kind in audit:
                a = audit[kind]
                lines.append(
                    f"- {kind}: {_g(a.get('correct'), '{:.0f}')} of "
                    f"{_g(a.get('guesses'), '{:.0f}')} guesses right on "
                    f"{_g(a.get('m'), '{:.0f}')} canaries: ε ≥ "
                    f"{_g(a.get('epsilon_lower_bound'), '{:.4f}')}."
                )
    gates = card["gates"]
    lines += ["", "## Gates at registration", "", f"Policy: {_pairs(gates['policy'])}.", ""]
    for g in gates["at_registration"]:
        lines.append(f"- {'pass' if g['passed'] else 'FAIL'} {g['gate']}: {g['reason']}")
    lines.append(f"- utility: {gates['utility']}.")
    lines += ["", "## Provenance", ""]
    lines += [
        f"- {k}: `{v}`"
        for k, v in model.items()
        if k not in ("entry", "method") and not isinstance(v, dict)
    ]
    return "\n".join(lines) + "\n"


def write_card(card: Mapping[str, Any], directory: Path) -> Path:
    """model_card.json and model_card.md into ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    io.write_json(directory / CARD_JSON, card)
    (directory / CARD_MD).write_text(card_markdown(card))
    return directory


def version_card(
    mlflow_client: Any,
    version: Any,
    uri: str,
) -> dict[str, Any]:  # pragma: no mutate block
    """The version's model card (JSON, at the root of its logged model's artifacts), or, for a
    version registered before cards existed, the little its tags tell."""
    card = version_json(mlflow_client, version, uri, CARD_JSON)
    return card if isinstance(card, dict) else card_from_tags(dict(version.tags))


def logged_model_id(version: Any) -> str:
    """The logged model a registered version was made from (its `models:/<id>` source)."""
    return getattr(version, "model_id", None) or str(version.source).removeprefix("models:/")


def version_json(mlflow_client: Any, version: Any, uri: str, path: str) -> Any | None:
    """A JSON artifact of the version's logged model (None when it has none: an older one)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    model_id = logged_model_id(version)
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # one small file: no progress bar
    try:
        location = mlflow_client.get_logged_model(model_id).artifact_location
        with tempfile.TemporaryDirectory() as tmp, io.environ(quiet):
            found = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{location.rstrip('/')}/{path}",
                dst_path=tmp,
                tracking_uri=uri,
            )
            return json.loads(Path(found).read_text())
    except (MlflowException, OSError, ValueError):
        return None
