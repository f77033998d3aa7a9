"""LMO-DP (arXiv 2405.18776), soundly: noise sampler, RDP accounting and parameter search.

One import point for the training loop; the parts live in lmo_mechanism (sampling, MGF),
lmo_accounting (the sound bound and the paper's unsound numbers) and lmo_search (grid search).
"""

from privtune.privacy.lmo_accounting import (
    MAX_ORDER,
    PaperEpsilon,
    epsilon,
    paper_epsilon,
    rdp_at_shift,
    rdp_per_step,
    segment_rdp,
    subsampled_rdp,
    valid_orders,
)
from privtune.privacy.lmo_mechanism import (
    LMOParams,
    lmo_noise,
    mean_abs_noise,
    mean_inverse_scale,
    mgf,
    noise_std,
    sample_inverse_scales,
    usefulness,
)
from privtune.privacy.lmo_search import (
    EXTENDED_GRID,
    PAPER_GRID,
    LMOGrid,
    LMOSearchResult,
    search,
)

__all__ = [
    "EXTENDED_GRID",
    "MAX_ORDER",
    "PAPER_GRID",
    "LMOGrid",
    "LMOParams",
    "LMOSearchResult",
    "PaperEpsilon",
    "epsilon",
    "lmo_noise",
    "mean_abs_noise",
    "mean_inverse_scale",
    "mgf",
    "noise_std",
    "paper_epsilon",
    "rdp_at_shift",
    "rdp_per_step",
    "sample_inverse_scales",
    "search",
    "segment_rdp",
    "subsampled_rdp",
    "usefulness",
    "valid_orders",
]
