"""The model registry: register fine-tuned models as MLflow versions, promote through gates.

`register` logs base + adapter as one pyfunc (`load_model("models:/<name>@champion").predict`)
and tags the version with its privacy contract and evidence; `promote` moves `champion` only
when every gate in `Gates` holds (`promote_best`: to the best eligible of the new versions);
`rollback` restores the previous champion.
"""

from privtune.registry.promotion import (
    Decision,
    GateResult,
    Gates,
    Rollback,
    Selection,
    evaluate_gates,
    pending_versions,
    promote,
    promote_best,
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
    "Selection",
    "promote",
    "promote_best",
    "register",
    "rollback",
    "version_tags",
]
