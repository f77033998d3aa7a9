"""The non-private step: the summed gradient over the expected batch size, no noise, no ledger.

The reference every private method is compared with; it shares the loop, the sampler and the
scaling so that only the privacy differs.
"""

from __future__ import annotations

import torch

from privtune.privacy.action import Action
from privtune.privacy.mechanisms.base import Mechanism, StepSpec, StepStats


class NoNoise(Mechanism):
    name = "none"
    private = False
    per_sample = False

    def admit(self, action: Action, noise: float) -> StepSpec:
        return StepSpec(action, 0.0)

    def accumulate(
        self,
        spec: StepSpec,
        extra_rows: torch.Tensor | None = None,
        records: int | None = None,
    ) -> None:
        """Autograd has summed the records' gradients into ``p.grad``; add the extra rows."""
        del records  # no per-sample view to check
        if extra_rows is None:
            return
        self.check_extra_rows(extra_rows)
        summed = extra_rows.sum(0).split(self._sizes)
        for p, part in zip(self.parameters, summed, strict=True):
            total = part.view_as(p).to(device=p.device, dtype=p.dtype)
            p.grad = total if p.grad is None else p.grad + total

    def release(
        self, spec: StepSpec, expected_batch_size: float, batch_size: int
    ) -> StepStats | None:
        """None for an empty batch: nothing to learn from and no privacy to account."""
        if batch_size == 0:
            return None
        for p in self.parameters:  # a replica whose share of the batch was empty
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.replica.sum_([p.grad for p in self.parameters])
        for p in self.parameters:
            p.grad = p.grad / expected_batch_size
        return StepStats(None, 0.0)
