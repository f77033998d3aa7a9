"""Privacy attacks on a fine-tuned model: membership inference, canary exposure and
extraction, and a one-run empirical privacy audit (see run.run_attacks for all at once)."""

from privtune.attacks.audit import (
    AuditResult,
    epsilon_lower_bound,
    make_guesses,
    one_run_audit,
    p_value,
)
from privtune.attacks.exposure import (
    CanaryExposure,
    canary_exposures,
    chunked_continuation_logprobs,
    exposure_from_scores,
)
from privtune.attacks.extraction import CanaryExtraction, canary_extraction, reproduces
from privtune.attacks.membership import balanced_sets, membership_inference, without_canaries
from privtune.attacks.roc import (
    RocSummary,
    auc_confidence_interval,
    plot_roc,
    roc_summary,
    tpr_at_fpr,
)
from privtune.attacks.run import AttackConfig, run_attacks, summarize
from privtune.attacks.scoring import SCORE_NAMES, membership_scores, token_logprobs

__all__ = [
    "SCORE_NAMES",
    "AttackConfig",
    "AuditResult",
    "CanaryExposure",
    "CanaryExtraction",
    "RocSummary",
    "auc_confidence_interval",
    "balanced_sets",
    "canary_exposures",
    "canary_extraction",
    "chunked_continuation_logprobs",
    "epsilon_lower_bound",
    "exposure_from_scores",
    "make_guesses",
    "membership_inference",
    "membership_scores",
    "one_run_audit",
    "p_value",
    "plot_roc",
    "reproduces",
    "roc_summary",
    "run_attacks",
    "summarize",
    "token_logprobs",
    "tpr_at_fpr",
    "without_canaries",
]
