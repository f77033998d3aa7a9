"""Registration: every fine-tuned model becomes a tagged version of its use case's model.

A version is keyed by (fine-tuning run id, adapter content hash, evidence hash): registering
the same model with the same results again returns the existing version instead of a
duplicate. Its tags are the headline (about a dozen); its description opens with the verdict;
its privacy model card (registry/card.py) holds the details.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from privtune import io, tracking
from privtune.config import BASE_DIR, METRICS_DIR, MODELS_DIR, PLOTS_DIR, PREPARED_DIR, Gates
from privtune.errors import ModelError
from privtune.record_scores import ARTIFACT as RECORD_SCORES
from privtune.record_scores import record_scores_path
from privtune.registry.card import CARD_ARTIFACT
from privtune.stages.common import BASE_INFO

KEY_TAG = "privtune.version_key"
# On a logged model once its card, metrics and run link are all in place: a retry reuses only
# a complete one (and deletes an attempt that crashed half way).
COMPLETE_TAG = "privtune.complete"
CHALLENGER = "challenger"
CHAMPION = "champion"
ATTACK_PREFIX = "attack."
UTILITY_PREFIX = "utility."
EVALUATED_ON_TAG = "evaluated_on"
# "true" when the run drew its sampler and noise seeds from a secret (finetune.secret_noise)
NOISE_TAG = "secret_noise"
# The headline tags of a version (about a dozen; the details are in its model card).
PRIVACY_FIELDS = ("epsilon", "target_epsilon", "delta", "accountant")
# The attack numbers the gates read: the best MIA AUC and TPR at 1 % FPR with their best lower
# confidence bounds (the gates decide on those), and the audit's bound.
ATTACK_FIELDS = (
    "mia_auc_max",
    "mia_auc_ci_low_max",
    "mia_tpr_at_fpr_0.01_max",
    "mia_tpr_at_fpr_0.01_ci_low_max",
    "audit_epsilon_lower_bound",
)
UTILITY_FIELDS = ("test_perplexity", "medication_accuracy")


def model_name(entry: str) -> str:
    """The pyfunc's name in its run and among logged models (the version's "Source model" in
    MLflow's UI): the method entry, without the characters MLflow refuses there."""
    return re.sub(r"[/:.%\"']", "-", entry)


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    created: bool  # False when an identical model was already registered


def client(root: str | Path = ".") -> Any:
    tracking.disable_telemetry()
    import mlflow

    uri = tracking.checked_uri(root)
    return mlflow.MlflowClient(uri, registry_uri=uri)


def tracking_uri(root: str | Path) -> str:
    return tracking.tracking_uri(root)


def _tag(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _dvc_stage(root: Path, entry: str) -> dict[str, str]:
    """The finetune@<entry> stage in dvc.lock: `dvc.outs_md5` is DVC's md5 of the model
    directory it cached (`dvc checkout` restores exactly it); `dvc.deps_md5` hashes the stage's
    input md5s (data, base model, code), i.e. what produced it, and `dvc.base_md5` is the base
    model's among them. Empty when not locked."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    stage = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(f"finetune@{entry}")
    if not stage:
        return {}
    tags = {"dvc.stage": f"finetune@{entry}"}
    outs = {o["path"]: o.get("md5") for o in stage.get("outs", [])}
    if outs.get(str(MODELS_DIR / entry)):
        tags["dvc.outs_md5"] = outs[str(MODELS_DIR / entry)]
    base = next((d.get("md5") for d in stage.get("deps", []) if d["path"] == str(BASE_DIR)), None)
    if base:  # the base model the fine-tuning trained on, by DVC's md5 of its directory
        tags["dvc.base_md5"] = base
    deps = sorted(f"{d['path']}:{d.get('md5')}" for d in stage.get("deps", []))
    if deps:
        tags["dvc.deps_md5"] = hashlib.md5("\n".join(deps).encode()).hexdigest()
    return tags


def _model_info(root: Path, entry: str) -> dict[str, Any]:
    model_dir = root / MODELS_DIR / entry
    info_path = model_dir / "finetune.json"
    if not info_path.is_file() or not (model_dir / "adapter").is_dir():
        raise ModelError(
            str(model_dir), "fine-tuned model missing", f"run `dvc repro finetune@{entry}` first"
        )
    return io.read_json(info_path)


def evidence_sha256(root: str | Path, entry: str) -> str:
    """Hash of what a version's card states: the fine-tuning, evaluation and attack results and
    the data. New evidence for the same adapter is a new version (its card ships inside the
    model, so it cannot be edited in place)."""
    root = Path(root)
    info = _model_info(root, entry)
    card = root / PREPARED_DIR / "data_card.json"
    payload = {
        "finetune": info.get("metrics", {}),
        "evaluate": io.read_numbers(root / METRICS_DIR / f"evaluate-{entry}.json"),
        "attack": io.read_numbers(root / METRICS_DIR / f"attack-{entry}.json"),
        "data": io.read_json(card).get("content_sha256") if card.is_file() else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def version_tags(root: str | Path, entry: str, gates: Gates | None = None) -> dict[str, str]:
    """The headline tags of a version: method, privacy contract, the numbers the gates read
    (attacks, audit, utility), data hash and code commit, and its key. Non-private models get
    epsilon = inf. Everything else is in the model card."""
    root = Path(root)
    info = _model_info(root, entry)
    metrics = info.get("metrics", {})
    private = bool(metrics.get("private", "epsilon" in metrics))
    tags: dict[str, Any] = {"method": info.get("method", metrics.get("method", "unknown"))}
    tags |= {field: metrics[field] for field in PRIVACY_FIELDS if field in metrics}
    if not private:
        tags["epsilon"] = math.inf
    if private and "secret_noise" in (finetune := info.get("finetune", {})):
        # absent: a seeded run from before the option, or a non-private one (no noise drawn)
        tags[NOISE_TAG] = str(bool(finetune["secret_noise"])).lower()
    attack = io.read_numbers(root / METRICS_DIR / f"attack-{entry}.json")
    tags |= {f"{ATTACK_PREFIX}{k}": attack[k] for k in ATTACK_FIELDS if k in attack}
    evaluation = io.read_numbers(root / METRICS_DIR / f"evaluate-{entry}.json")
    utility = {*UTILITY_FIELDS, (gates or Gates()).utility_metric}
    tags |= {f"{UTILITY_PREFIX}{k}": evaluation[k] for k in sorted(utility) if k in evaluation}
    evaluated = root / METRICS_DIR / f"evaluate-{entry}.json"
    if evaluated.is_file() and "evaluated_on" in (on := io.read_metrics(evaluated)):
        tags[EVALUATED_ON_TAG] = on["evaluated_on"]  # what the utility numbers were measured on
    card = root / PREPARED_DIR / "data_card.json"
    if card.is_file():
        tags["data_sha256"] = io.read_json(card)["content_sha256"]
    tags["git_commit"] = tracking.git_commit(root)
    adapter = io.tree_sha256(root / MODELS_DIR / entry / "adapter")
    tags[KEY_TAG] = f"{info['run_id']}:{adapter}:{evidence_sha256(root, entry)[:16]}"
    return {k: _tag(v) for k, v in tags.items()}


def provenance(root: str | Path, entry: str) -> dict[str, str]:
    """Where the model came from (for its card): run, adapter and base, code, DVC stage."""
    root = Path(root)
    info = _model_info(root, entry)
    built = root / BASE_DIR / BASE_INFO
    return {
        "finetune_run_id": info["run_id"],
        # a run copied from another experiment (same inputs): the run that trained the model
        **({"trained_in_run_id": info["reused_from"]} if "reused_from" in info else {}),
        "adapter_sha256": io.tree_sha256(root / MODELS_DIR / entry / "adapter"),
        "base": str(info.get("base", BASE_DIR)),
        # what the base stage made it from (its files' md5: dvc.base_md5, from dvc.lock)
        "base_source": str(io.read_json(built).get("source")) if built.is_file() else "unrecorded",
        "git_commit": tracking.git_commit(root),
        "git_modified": tracking.git_modified(root),  # "none": the commit alone, as registered
        **_dvc_stage(root, entry),
    }


def find_version(name: str, key: str, root: str | Path = ".") -> Any | None:
    """The version of `name` registered under this key, if any."""
    found = client(root).search_model_versions(f"name = '{name}' and tags.`{KEY_TAG}` = '{key}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def register(
    entry: str,
    name: str,
    root: str | Path = ".",
    *,
    alias: str = CHALLENGER,
    gates: Gates | None = None,
    confidence: float | None = None,
    membership_counts: tuple[int, int] | None = None,
) -> RegisteredVersion:
    """Register models/<entry> (base + adapter + privacy model card, one pyfunc) as a version
    of `name` with the `challenger` alias; reuse the version of an identical model and
    evidence. The fine-tuning run is never reopened: the evaluation and attack results join
    it, and the logged model, through the client API, so the run's duration stays the
    training's."""
    from privtune.registry.card import build_card, verdict_line, write_card
    from privtune.registry.promotion import describe_registered_model, evaluate_gates

    root = Path(root)
    gates = gates or Gates()
    tags = version_tags(root, entry, gates)
    info = _model_info(root, entry)
    run_id = info["run_id"]
    mlflow_client = client(root)
    existing = find_version(name, tags[KEY_TAG], root)
    if existing is not None and existing.description:
        _link_version(mlflow_client, name, existing)  # registered before the link was made
        return RegisteredVersion(name, str(existing.version), run_id, created=False)

    if not (root / BASE_DIR).is_dir():
        raise ModelError(str(BASE_DIR), "base model missing", "run `dvc repro base` first")
    # The gates that do not depend on the champion, judged now for the card.
    at_registration = [g for g in evaluate_gates(gates, tags, None) if g.gate != "utility"]
    card = build_card(
        root,
        entry,
        gates=gates,
        gate_results=at_registration,
        provenance=provenance(root, entry),
        confidence=confidence,
        membership_counts=membership_counts,
    )
    if existing is None:
        # mlflow.pyfunc.log_model logs through the global tracking URI, and a sqlite registry
        # looks the logged model up through it (MlflowClient()): set for these calls only
        with tempfile.TemporaryDirectory() as tmp, tracking.use_store(root):
            card_dir = write_card(card, Path(tmp) / "model_card")
            last_step = max(0, int(info.get("metrics", {}).get("steps", 1)) - 1)
            model_uri, model_id = _logged_model(
                root, entry, run_id, tags[KEY_TAG], card_dir, last_step
            )
            if not _registered_model_exists(mlflow_client, name):
                _create_registered_model(mlflow_client, name)
            version = mlflow_client.create_model_version(
                name, model_uri, run_id=run_id, tags=tags, model_id=model_id
            )
    else:  # an earlier attempt created it and stopped before its description and alias
        version = existing
    _link_version(mlflow_client, name, version)
    pending = f"**not yet judged** (`privtune promote --version {version.version}`)"
    section = card_section(card, artifacts_link(mlflow_client, version))
    description = "\n\n".join([verdict_line(card, gates, pending), section])
    mlflow_client.update_model_version(name, version.version, description=description)
    set_alias(mlflow_client, name, alias, str(version.version))
    # its tags (champion, champion.why) race like the alias when two workers register at once
    retry_unique(lambda: describe_registered_model(mlflow_client, name))
    return RegisteredVersion(name, str(version.version), run_id, created=existing is None)


def _link_version(mlflow_client, name: str, version: Any) -> None:
    """Tag the logged model with the version made of it, as mlflow.register_model does (we
    call create_model_version for its tags): else MLflow's UI calls the champion's logged
    model "Not registered" and offers to register it again, without its verdict."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    # the version's source is models:/<id> (the returned entity may not carry model_id)
    source = str(version.source or "")
    from_source = source.removeprefix("models:/") if source.startswith("models:/") else None
    model_id = getattr(version, "model_id", None) or from_source
    if not model_id:
        return
    try:
        model = mlflow_client.get_logged_model(model_id)
    except MlflowException as err:  # deleted since: nothing to link (mlflow.register_model too)
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        warnings.warn(f"logged model {model_id} of {name} v{version.version} is gone", stacklevel=2)
        return
    linked = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    entry = {"name": name, "version": str(version.version)}
    if entry not in [{"name": e["name"], "version": str(e["version"])} for e in linked]:
        value = json.dumps([*linked, entry])
        mlflow_client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: value})


def artifacts_link(mlflow_client: Any, version: Any) -> str | None:
    """The MLflow UI's page of the version's logged-model artifacts, where model_card.md is
    (relative to the UI's root, so a tracking server's UI resolves it too); None for a version
    without a logged model (registered by an older privtune)."""
    from mlflow.exceptions import MlflowException

    from privtune.registry.card import logged_model_id

    model_id = logged_model_id(version)
    try:
        experiment_id = mlflow_client.get_logged_model(model_id).experiment_id
    except MlflowException:
        return None
    return f"#/experiments/{experiment_id}/models/{model_id}/artifacts"


def card_section(card: dict[str, Any], link: str | None = None) -> str:
    """The part of a version's description that points at its model card (``link``: the
    page of the model's artifacts, :func:`artifacts_link`)."""
    model = card["model"]
    run = f"`{model.get('finetune_run_id')}`"
    if model.get("trained_in_run_id"):  # copied from another experiment
        run += f" (a copy of run `{model['trained_in_run_id']}`, which trained it)"
    open_it = f" [Open the model's artifacts]({link}) (a new tab): model_card.md." if link else ""
    return (
        "**Privacy model card**\n\n"
        "`model_card.md` (to read) and `model_card.json` (for tools), at the root of this "
        "version's model artifacts and inside the pyfunc (`artifacts/model_card/`): the "
        "contract, the data hash and size, the accountant and ledger, every attack with its "
        f"record counts and intervals, the audit and the gates.{open_it}\n\n"
        f"Fine-tuning run {run}, adapter sha256 "
        f"`{str(model.get('adapter_sha256'))[:16]}…`, data sha256 "
        f"`{str(card['data'].get('content_sha256'))[:16]}…`, git `{model.get('git_commit')}`."
    )


@contextlib.contextmanager
def _quiet_log_model() -> Iterator[None]:
    """MLflow's advice that does not apply here, said for every version it logs: an input
    example (it would be a record) and CloudPickle (GenerationModel is privtune's own class,
    pickled by reference); and its bars for copying the local artifacts into the store, a
    fraction of a second each."""
    import logging

    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    with warnings.catch_warnings(), io.environ({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
        warnings.filterwarnings("ignore", ".*An input example was not provided")
        pyfunc_log.setLevel(logging.ERROR)  # "Passing a Python object as `python_model`"
        try:
            yield
        finally:
            pyfunc_log.setLevel(level)


def _logged_model(
    root: Path, entry: str, run_id: str, key: str, card_dir: Path, step: int
) -> tuple[str, str]:
    """(uri, id) of the complete pyfunc for this key: reuse one an earlier attempt finished,
    else log base + adapter + card now, linked to the run at its last step, with the run's
    metrics of that step and the evaluation and attack results as the model's metrics."""
    import mlflow
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException

    from privtune.registry.pyfunc import GenerationModel, pip_requirements, signature

    mlflow_client = mlflow.MlflowClient(tracking_uri(root))
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException:
        raise ModelError(
            str(MODELS_DIR / entry / "finetune.json"),
            f"fine-tuning run {run_id} is not in the MLflow store {tracking_uri(root)}",
            "register against the store the model was trained with (MLFLOW_TRACKING_URI)",
        ) from None
    experiment = run.info.experiment_id
    earlier = mlflow.search_logged_models(
        experiment_ids=[experiment],
        filter_string=f"tags.`{KEY_TAG}` = '{key}'",
        output_format="list",
    )
    for model in earlier:
        if model.tags.get(COMPLETE_TAG) == "true":
            return f"models:/{model.model_id}", model.model_id
    for model in earlier:  # an attempt that crashed half way: never a version's source
        mlflow_client.delete_logged_model(model.model_id)

    model = mlflow_client.create_logged_model(
        experiment,
        name=model_name(entry),
        source_run_id=run_id,
        tags={KEY_TAG: key},
        params=dict(run.data.params),
    )
    with _quiet_log_model():
        mlflow.pyfunc.log_model(
            name=model_name(entry),
            python_model=GenerationModel(),
            artifacts={
                "base": str(root / BASE_DIR),
                "adapter": str(root / MODELS_DIR / entry / "adapter"),
                CARD_ARTIFACT: str(card_dir),
            },
            signature=signature(),
            pip_requirements=pip_requirements(),
            model_id=model.model_id,
        )
    mlflow_client.log_model_artifacts(model.model_id, str(card_dir))
    scores = _matching_scores(root, entry)
    if scores is not None:  # what a promotion resamples to compare it with a champion
        with tempfile.TemporaryDirectory() as tmp:
            named = Path(tmp) / Path(RECORD_SCORES).name
            shutil.copyfile(scores, named)
            folder = str(Path(RECORD_SCORES).parent)
            mlflow_client.log_model_artifact(model.model_id, str(named), folder)
    mlflow_client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    _attach_results(root, entry, run, model.model_id, step)
    mlflow_client.set_logged_model_tags(model.model_id, {COMPLETE_TAG: "true"})
    return f"models:/{model.model_id}", model.model_id


def _matching_scores(root: Path, entry: str) -> Path | None:
    """The method's per-record scores, if they are those of the evaluation being registered
    (DVC caches them and git ignores them: after a `git checkout` without `dvc checkout` they
    can be another model's); else None, and the promotion measures the two models again."""
    from privtune.record_scores import read_scores

    path = root / record_scores_path(entry)
    evaluated = root / METRICS_DIR / f"evaluate-{entry}.json"
    if not path.is_file() or not evaluated.is_file():
        return None
    try:
        (found_on, parts), metrics = read_scores(path), io.read_json(evaluated)
    except (OSError, ValueError):
        found_on, parts, metrics = None, {}, {}
    on = metrics.get("evaluated_on")
    same = on is not None and found_on == on
    same = same and all(
        metric in metrics and math.isclose(p.value(), float(metrics[metric]), rel_tol=1e-9)
        for metric, p in parts.items()
    )
    if not parts or not same:
        warnings.warn(
            f"{path} is not the per-record scores of {evaluated} (rerun `dvc repro "
            f"evaluate@{entry}` or `dvc checkout`): the version is registered without them",
            stacklevel=2,
        )
        return None
    return path


def _attach_results(root: Path, entry: str, run: Any, model_id: str, step: int) -> None:
    """The run's metrics at its last step become the logged model's (as MLflow does for a
    model logged inside a run); the evaluation and attack results join both, at that step,
    utility under its own names and attacks under `attack.`; the ROC plot joins both too. A
    run trained before runs carried their metric glossary gets it now (a tag: the run stays
    closed)."""
    from mlflow.entities import Metric

    mlflow_client = client(root)
    run_id = run.info.run_id
    if tracking.NOTE_TAG not in run.data.tags:  # a run trained before runs were described
        metrics = _model_info(root, entry).get("metrics", {})
        note = tracking.finetune_note(
            entry, str(metrics.get("method")), metrics.get("target_epsilon")
        )
        mlflow_client.set_tag(run_id, tracking.NOTE_TAG, note)
    # the last value of each metric at that step (the run may log one twice there: a curve's
    # last point and the final figure), so the model shows each metric once
    last = {}
    for key in run.data.metrics:
        points = [m for m in mlflow_client.get_metric_history(run_id, key) if m.step == step]
        if points:
            last[key] = max(points, key=lambda m: m.timestamp)
    at_step = [
        Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id) for m in last.values()
    ]
    if at_step:  # same timestamps: the run's own points are not duplicated
        mlflow_client.log_batch(run_id, metrics=at_step)
    results: dict[str, float] = {}
    for stage, prefix in (("evaluate", ""), ("attack", ATTACK_PREFIX)):
        numbers = io.read_numbers(root / METRICS_DIR / f"{stage}-{entry}.json")
        results |= {
            f"{prefix}{k}": float(v)
            for k, v in numbers.items()
            if not (stage == "evaluate" and k == "epsilon")  # finetune logs its curve
        }
    tracking.attach_metrics(root, run_id, results, step, model_id=model_id)
    roc = root / PLOTS_DIR / f"roc-{entry}.png"
    if roc.is_file():
        mlflow_client.log_artifact(run_id, str(roc), "attack")
        mlflow_client.log_model_artifact(model_id, str(roc), "attack")


def _registered_model_exists(mlflow_client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_registered_model(name)
    except MlflowException:
        return False
    return True


def _create_registered_model(mlflow_client: Any, name: str) -> None:
    """Create it; another worker creating it first (a shared server) is not an error."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def retry_unique(write: Callable[[], None], attempts: int = 4) -> None:
    """Run an idempotent registry write, again after a unique-key clash. MLflow's SQL store
    reads, then inserts, an alias or a tag: two workers writing the same new one at once on a
    shared server make one insert fail on the primary key (PostgreSQL UniqueViolation). Once
    the row exists a retry updates it, so the last writer wins, as it does one at a time."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            write()
            return
        except MlflowException as err:
            if "unique" not in str(err).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def set_alias(mlflow_client: Any, name: str, alias: str, version: str, attempts: int = 4) -> None:
    """Point ``alias`` at ``version``, retried on a concurrent worker's clash (retry_unique)."""
    retry_unique(lambda: mlflow_client.set_registered_model_alias(name, alias, version), attempts)
