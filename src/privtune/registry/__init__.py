"""The model registry: register fine-tuned models as MLflow versions, promote through gates.

`register` logs base + adapter as one pyfunc (`load_model("models:/<name>@champion").predict`)
and tags the version with its privacy contract and evidence; `promote` moves `champion` only
when every gate in `Gates` holds; `rollback` restores the previous champion.
"""

from privtune.registry.promotion import (
    Decision,
    GateResult,
    Gates,
    Rollback,
    evaluate_gates,
    pending_versions,
    promote,
    rollback,
)
from privtune.registry.register import (
    CHALLENGER,
    CHAMPION,
    RegisteredVersion,
    find_version,
    register,
    version_tags,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "Decision",
    "GateResult",
    "Gates",
    "RegisteredVersion",
    "Rollback",
    "evaluate_gates",
    "find_version",
    "pending_versions",
    "promote",
    "register",
    "rollback",
    "version_tags",
]
