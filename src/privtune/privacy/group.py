"""What the per-record guarantee says for a patient with several records (group privacy).

The unit of privacy is one record. A mechanism that is (ε, δ)-DP for one record is
(k·ε, k·e^((k−1)·ε)·δ)-DP for any k records together (group privacy; e.g. Vadhan, "The
Complexity of Differential Privacy", 2017): the bound a patient with k training records gets.
It is loose, and at ε = 8 it says nothing from k = 2 on; `prepare.max_records_per_group` bounds
k, and a per-patient (user-level) DP mode would be the real fix.
"""

from __future__ import annotations

import math
from typing import Any


def group_guarantee(k: int, epsilon: float, delta: float) -> tuple[float, float | None]:
    """(ε, δ) for a group of ``k`` records; δ None when the bound is 1 or more (none at all)."""
    if k < 1:
        raise ValueError(f"a group has at least one record, got k = {k}")
    if delta <= 0:  # pure DP: a group's δ is 0 as well
        return k * epsilon, 0.0
    # in logs: e^((k-1)·ε) overflows a float from (k-1)·ε ≈ 710 (90 notes of a patient at ε 8)
    log_delta = math.log(k) + (k - 1) * epsilon + math.log(delta)
    return k * epsilon, (math.exp(log_delta) if log_delta < 0 else None)


def per_group(groups: dict[str, Any] | None, epsilon: float, delta: float) -> dict[str, Any] | None:
    """The model card's per-patient line from the data card's ``groups`` (None without one)."""
    if not groups:
        return None
    k = int(groups["train_records_per_group_max"])
    group_epsilon, group_delta = group_guarantee(k, epsilon, delta)
    return {
        "column": groups.get("column"),
        "max_training_records_of_one_group": k,
        "records_per_group_cap": groups.get("max_records_per_group"),
        "epsilon": group_epsilon,
        "delta": group_delta,  # null: group privacy gives no bound at this k and epsilon
    }


def describe(k: int, epsilon: float, delta: float) -> str:
    """The per-patient bound in words, for `privtune check`."""
    group_epsilon, group_delta = group_guarantee(k, epsilon, delta)
    if group_delta is None:
        return f"a patient with {k} training records: no bound (group privacy's delta >= 1)"
    return (
        f"a patient with {k} training records: epsilon {group_epsilon:g}, delta {group_delta:.2g}"
    )
