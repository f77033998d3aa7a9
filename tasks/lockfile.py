"""A stage's dvc.lock entry, carried between checkouts on different machines (`share`).

`dvc pull <stage>` fetches the outputs that *this* checkout's dvc.lock names, and a stage run on
another machine wrote its entry into that machine's lock: pulling by one's own lock brings the
previous model after an input changed. So the entries travel with the run, through the Prefect
server both sides already talk to: the dispatcher passes the entries of the stages it built
(`prepare`, `base`) to the worker as a flow parameter, the worker publishes its fine-tuning's
entry, with the outputs the remote does not hold (`cache: false` metrics and plots), as an
artifact of its flow run (readable in the UI too), and each side adopts the other's entries
before it pulls. DVC then checks, as always, that the stage is current.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from pathlib import Path
from typing import Any

LOCK = "dvc.lock"
FENCE = "```json\n"


class LockEntryError(RuntimeError):
    """A stage's dvc.lock entry is missing, or a published one cannot be read."""


def entries(root: str | Path, targets: list[str]) -> dict[str, dict[str, Any]]:
    """The dvc.lock entries of ``targets`` in the checkout at ``root`` (plain, JSON-able)."""
    from dvc.utils.serialize import load_yaml

    path = Path(root) / LOCK
    stages = (load_yaml(path) if path.is_file() else {}).get("stages", {})
    missing = [t for t in targets if t not in stages]
    if missing:
        raise LockEntryError(
            f"{path} has no entry for {', '.join(missing)}: run `dvc repro "
            f"{' '.join(missing)}` in {root} first"
        )
    return {t: stages[t] for t in targets}


def adopt(root: str | Path, found: dict[str, dict[str, Any]]) -> None:
    """Write ``found`` (stage name -> entry) into the checkout's dvc.lock, replacing those
    stages' entries and keeping the others, under DVC's repository lock; the file is replaced
    whole (DVC's own writer truncates it in place)."""
    from dvc.repo import Repo
    from dvc.utils.serialize import dumps_yaml, parse_yaml_for_update

    from privtune.io import atomic_file

    path = Path(root) / LOCK
    with contextlib.chdir(root), Repo(".") as repo, repo.lock:
        text = path.read_text() if path.is_file() else ""
        data = parse_yaml_for_update(text, str(path)) if text else None
        data = data or {"schema": "2.0"}
        data.setdefault("stages", {}).update(found)
        with atomic_file(path) as handle:
            handle.write(dumps_yaml(data))


def uncached(root: str | Path, target: str) -> list[str]:
    """The stage's outputs that the DVC remote does not hold (`cache: false`: its metrics and
    plots, meant for git), relative to ``root``."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as repo:
        (stage,) = repo.stage.collect(target)
        return [str(out.def_path) for out in stage.outs if not out.use_cache]


def _pack(data: bytes) -> dict[str, str]:
    """A file's bytes for JSON: as text when it is UTF-8 (metrics, CSV), else base64 (a PNG)."""
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def _unpack(packed: dict[str, str]) -> bytes:
    if "text" in packed:
        return packed["text"].encode("utf-8")
    return base64.b64decode(packed["base64"])


def artifact_key(target: str) -> str:
    """Prefect's artifact keys hold lowercase letters, digits and dashes only."""
    return "dvc-lock-" + re.sub(r"[^a-z0-9]+", "-", target.lower()).strip("-")


def publish(root: str | Path, target: str) -> None:
    """Attach ``target``'s dvc.lock entry and uncached outputs to the current flow run."""
    from prefect.artifacts import create_markdown_artifact

    built = {
        "stage": target,
        "entry": entries(root, [target])[target],
        "files": {path: _pack((Path(root) / path).read_bytes()) for path in uncached(root, target)},
    }
    create_markdown_artifact(
        markdown=f"`{target}` as built by this run: its `dvc.lock` entry (`dvc pull {target}` "
        f"fetches these outputs) and the outputs the DVC remote does not hold.\n\n"
        f"{FENCE}{json.dumps(built, indent=1)}\n```\n",
        key=artifact_key(target),
        description=f"{target}'s dvc.lock entry and uncached outputs",
    )


def published(client: Any, flow_run_id: Any, target: str) -> dict[str, Any]:
    """What that flow run published for ``target``: {"stage", "entry", "files"}."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            key=ArtifactFilterKey(any_=[artifact_key(target)]),
        )
    )
    for artifact in found:
        text = str(artifact.data or "")
        if FENCE in text:
            built = json.loads(text.split(FENCE, 1)[1].rsplit("```", 1)[0])
            if built.get("stage") == target:
                return built
    raise LockEntryError(
        f"flow run {flow_run_id} published no dvc.lock entry for {target} (a worker whose "
        f"checkout predates `share` carrying it?): update the worker's checkout and run again "
        f"with force"
    )


def receive(root: str | Path, built: dict[str, Any]) -> None:
    """Write a published stage's uncached outputs, then adopt its dvc.lock entry (a cut-short
    write leaves the stage stale here, so the next run fetches it again)."""
    from privtune.io import atomic_file

    for path, packed in built["files"].items():
        with atomic_file(Path(root) / path, "wb") as handle:
            handle.write(_unpack(packed))
    adopt(root, {built["stage"]: built["entry"]})
