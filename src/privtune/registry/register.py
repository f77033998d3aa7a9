"""Registration: every fine-tuned model becomes a tagged version of its use case's model.

A version is keyed by (fine-tuning run id, adapter content hash): registering the same model
again returns the existing version instead of a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from privtune import io, tracking
from privtune.config import BASE_DIR, METRICS_DIR, MODELS_DIR, PREPARED_DIR
from privtune.errors import ModelError

KEY_TAG = "privtune.version_key"
CHALLENGER = "challenger"
CHAMPION = "champion"
ATTACK_PREFIX = "attack."
UTILITY_PREFIX = "utility."
# finetune.json["metrics"] fields carried as version tags (the privacy contract of the model).
PRIVACY_FIELDS = ("epsilon", "target_epsilon", "delta", "sample_rate", "steps", "accountant")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    created: bool  # False when an identical model was already registered


def client(root: str | Path = ".") -> Any:
    tracking.disable_telemetry()
    import mlflow

    return mlflow.MlflowClient(tracking_uri(root), registry_uri=tracking_uri(root))


def tracking_uri(root: str | Path) -> str:
    return tracking.tracking_uri(root)


def _tag(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _dvc_stage(root: Path, entry: str) -> dict[str, str]:
    """The finetune@<entry> stage in dvc.lock: `dvc.outs_md5` is DVC's md5 of the model
    directory it cached (`dvc checkout` restores exactly it); `dvc.deps_md5` hashes the stage's
    input md5s (data, base model, code), i.e. what produced it. Empty when not locked."""
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
    deps = sorted(f"{d['path']}:{d.get('md5')}" for d in stage.get("deps", []))
    if deps:
        tags["dvc.deps_md5"] = hashlib.md5("\n".join(deps).encode()).hexdigest()
    return tags


def version_tags(root: str | Path, entry: str) -> dict[str, str]:
    """Everything a reviewer needs on the version: privacy contract, attack and utility
    metrics, data and stage hashes, code commit. Non-private models get epsilon = inf."""
    root = Path(root)
    model_dir = root / MODELS_DIR / entry
    info_path = model_dir / "finetune.json"
    if not info_path.is_file() or not (model_dir / "adapter").is_dir():
        raise ModelError(
            str(model_dir), "fine-tuned model missing", f"run `dvc repro finetune@{entry}` first"
        )
    info = io.read_json(info_path)
    metrics = info.get("metrics", {})
    tags: dict[str, Any] = {
        "entry": entry,
        "method": info.get("method", metrics.get("method", "unknown")),
        "private": bool(metrics.get("private", "epsilon" in metrics)),
        "finetune_run_id": info["run_id"],
        "adapter_sha256": io.tree_sha256(model_dir / "adapter"),
        "git_commit": tracking.git_commit(root),
    }
    tags |= {field: metrics[field] for field in PRIVACY_FIELDS if field in metrics}
    if not tags["private"]:
        tags["epsilon"] = math.inf
    card = root / PREPARED_DIR / "data_card.json"
    if card.is_file():
        tags["data_sha256"] = io.read_json(card)["content_sha256"]
    for prefix, stage in ((ATTACK_PREFIX, "attack"), (UTILITY_PREFIX, "evaluate")):
        path = root / METRICS_DIR / f"{stage}-{entry}.json"
        if path.is_file():
            numbers = io.read_json(path)
            tags |= {
                f"{prefix}{k}": v
                for k, v in numbers.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
    tags |= _dvc_stage(root, entry)
    tags[KEY_TAG] = f"{tags['finetune_run_id']}:{tags['adapter_sha256']}"
    return {k: _tag(v) for k, v in tags.items()}


def find_version(name: str, key: str, root: str | Path = ".") -> Any | None:
    """The version of `name` registered under this key, if any."""
    found = client(root).search_model_versions(f"name = '{name}' and tags.`{KEY_TAG}` = '{key}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def register(
    entry: str, name: str, root: str | Path = ".", *, alias: str = CHALLENGER
) -> RegisteredVersion:
    """Log models/<entry> (base + adapter) as a pyfunc into its fine-tuning run and register it
    as a version of `name`, tagged, with the `challenger` alias; reuse an identical version."""
    root = Path(root)
    tags = version_tags(root, entry)
    mlflow_client = client(root)
    run_id = tags["finetune_run_id"]
    existing = find_version(name, tags[KEY_TAG], root)
    if existing is not None:
        return RegisteredVersion(name, str(existing.version), run_id, created=False)

    if not (root / BASE_DIR).is_dir():
        raise ModelError(str(BASE_DIR), "base model missing", "run `dvc repro base` first")
    model_uri, model_id = _logged_model(root, entry, run_id, tags[KEY_TAG])
    if not _registered_model_exists(mlflow_client, name):
        mlflow_client.create_registered_model(
            name, description="Privately fine-tuned generators (privtune); gated promotion."
        )
    version = mlflow_client.create_model_version(
        name, model_uri, run_id=run_id, tags=tags, model_id=model_id
    )
    mlflow_client.update_model_version(name, version.version, description=_describe(tags, entry))
    mlflow_client.set_registered_model_alias(name, alias, version.version)
    return RegisteredVersion(name, str(version.version), run_id, created=True)


def _logged_model(root: Path, entry: str, run_id: str, key: str) -> tuple[str, str]:
    """(uri, id) of the pyfunc for this key in the run: reuse one logged by an attempt that
    crashed before registering (a Prefect retry), else log base + adapter now."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from privtune.registry.pyfunc import GenerationModel, pip_requirements, signature

    mlflow.set_tracking_uri(tracking_uri(root))
    try:
        experiment = mlflow.get_run(run_id).info.experiment_id
    except MlflowException:
        raise ModelError(
            str(MODELS_DIR / entry / "finetune.json"),
            f"fine-tuning run {run_id} is not in the MLflow store {tracking_uri(root)}",
            "register against the store the model was trained with (MLFLOW_TRACKING_URI)",
        ) from None
    earlier = mlflow.search_logged_models(
        experiment_ids=[experiment],
        filter_string=f"tags.`{KEY_TAG}` = '{key}'",
        output_format="list",
    )
    if earlier:
        return f"models:/{earlier[0].model_id}", earlier[0].model_id
    with tracking.start_run(root=root, run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="generator",
            python_model=GenerationModel(),
            artifacts={
                "base": str(root / BASE_DIR),
                "adapter": str(root / MODELS_DIR / entry / "adapter"),
            },
            signature=signature(),
            pip_requirements=pip_requirements(),
            tags={KEY_TAG: key},
        )
    return info.model_uri, info.model_id


def _registered_model_exists(mlflow_client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_registered_model(name)
    except MlflowException:
        return False
    return True


def _describe(tags: dict[str, str], entry: str) -> str:
    shown = {k: tags[k] for k in ("method", "epsilon", "delta", "accountant") if k in tags}
    return f"{entry}: {json.dumps(shown)}; registered as {CHALLENGER}"
