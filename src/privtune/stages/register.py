"""Stage `register`: every method's fine-tuned model becomes a version of the use case's
registered model, tagged with its privacy contract, attack and utility metrics.

One stage for all methods (not one per method): registering is seconds of work after ten of
start-up, and an unchanged model keeps its version, so re-running it for every model is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from privtune import io
from privtune.config import Params

REGISTERED_FILE = Path("reports/registered.json")


def register(
    params: Params, names: Sequence[str] = (), root: Path = Path(".")
) -> dict[str, dict[str, Any]]:
    """Register models/<name> for the given method entries, or for all of them (the stage,
    which then writes reports/registered.json). Idempotent: the same model never gets a
    second version."""
    from privtune.registry import register as register_version

    entries = list(names) or list(params.methods)
    for name in entries:
        params.method(name)  # an unknown entry fails before anything is registered
    result = {}
    for name in entries:
        registered = register_version(name, params.registry.name, root)
        result[name] = {
            "registered_model": registered.name,
            "version": int(registered.version),
            "created": registered.created,
            "run_id": registered.run_id,
        }
    if not names:
        io.write_json(root / REGISTERED_FILE, result)
    return result
