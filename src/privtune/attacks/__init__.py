"""Privacy attacks on a fine-tuned model: membership inference, canary exposure and
extraction, and a one-run empirical privacy audit (see run.run_attacks for all at once).

The names below load their module on first use (PEP 562): `privtune check` reads the ROC
helpers and must not pay for transformers and peft, which extraction's modules import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "audit": ("AuditResult", "epsilon_lower_bound", "make_guesses", "one_run_audit", "p_value"),
    "exposure": (
        "CanaryExposure",
        "canary_exposures",
        "chunked_continuation_logprobs",
        "exposure_from_scores",
    ),
    "extraction": ("CanaryExtraction", "canary_extraction", "reproduces"),
    "membership": ("balanced_sets", "membership_inference", "without_canaries"),
    "roc": ("RocSummary", "auc_confidence_interval", "plot_roc", "roc_summary", "tpr_at_fpr"),
    "run": ("AttackConfig", "run_attacks", "summarize"),
    "scoring": ("SCORE_NAMES", "membership_scores", "token_logprobs"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
