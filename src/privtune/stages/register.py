"""Stage `register@<name>`: the fine-tuned model of `methods.<name>` becomes a version of the
use case's registered model, tagged with its privacy contract, attack and utility metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from privtune import io
from privtune.config import METRICS_DIR, Params


def register(params: Params, name: str, root: Path = Path(".")) -> dict[str, Any]:
    """Register models/<name> (idempotent: the same model never gets a second version)."""
    from privtune.registry import register as register_version

    params.method(name)
    registered = register_version(name, params.registry.name, root)
    result = {
        "registered_model": registered.name,
        "version": int(registered.version),
        "created": registered.created,
        "run_id": registered.run_id,
    }
    io.write_json(root / METRICS_DIR / f"register-{name}.json", result)
    return result
