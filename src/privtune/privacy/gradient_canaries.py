"""Dirac gradient canaries for the white-box one-run audit (Steinke, Nasr, Jagielski 2023,
arXiv 2305.08846, Sec. 7: canaries inserted in gradient space, the auditor sees the iterates).

A gradient canary is a pseudo-record whose per-sample gradient is zero everywhere except one
coordinate of the trainable parameters, where it is ``norm`` times a random sign. m canaries
are drawn, each included in the training set independently with probability 1/2; included ones
are records like any other: Poisson-sampled at rate q every step, clipped by the method's own
rule, noised with the step. After every step the auditor reads the released (noised, averaged)
gradient at each canary's coordinate; its score is the sum over steps of that value times the
canary's sign. Under (eps, delta)-DP of the whole run (every noisy step is a release the
accountant composes) these scores can only separate IN from OUT canaries as far as eps allows,
so the one-run audit of the scores is a lower bound on the true epsilon of the privacy code:
clipping, noise and accounting together.

Why white-box: a model that does not memorise text (the default pipeline's small one) gives a
black-box audit no power, while a gradient canary's signal does not depend on memorisation, so
the non-private model is audited at the ceiling m allows and a DP model at what its noise allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from privtune.io import read_json, write_json

AUDIT_FILE = "audit.json"  # in the fine-tuned model's directory
# Random streams of their own, so no other draw of the run (init, sampling, noise) shares them.
_COIN_STREAM, _PLACEMENT_STREAM = 0xA0D17, 0x417D17


def _coins(m: int, seed: int, inclusion: float = 0.5) -> np.ndarray:
    if not 0 < inclusion < 1:
        raise ValueError(f"the inclusion probability must be in (0, 1), got {inclusion}")
    return np.random.default_rng([seed, _COIN_STREAM]).random(m) < inclusion


def included_count(m: int, seed: int) -> int:
    """How many of m canaries drawn with this seed are IN: the records they add to N."""
    return int(_coins(m, seed).sum()) if m else 0


@dataclass
class GradientCanaries:
    """m Dirac canaries over a model's trainable parameters, and the auditor's running scores.

    ``included`` is the secret coin of each canary (IN when True); ``scores`` accumulate
    sign * released gradient at the canary's coordinate over every step.
    """

    coordinates: np.ndarray  # (m,) flat indices into the concatenated trainable parameters
    signs: np.ndarray  # (m,) +1 / -1
    included: np.ndarray  # (m,) bool
    norm: float
    scores: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.coordinates = np.asarray(self.coordinates, dtype=np.int64)
        self.signs = np.asarray(self.signs, dtype=np.float64)
        self.included = np.asarray(self.included, dtype=bool)
        m = self.coordinates.size
        if not (self.signs.shape == self.included.shape == (m,)):
            raise ValueError("coordinates, signs and included must have one entry per canary")
        if len(np.unique(self.coordinates)) != m:
            raise ValueError("gradient canaries need distinct coordinates")
        if not self.norm > 0:
            raise ValueError(f"the canary gradient norm must be > 0, got {self.norm}")
        if self.scores is None:
            self.scores = np.zeros(m)

    @classmethod
    def draw(
        cls, m: int, n_parameters: int, seed: int, norm: float, inclusion: float = 0.5
    ) -> GradientCanaries:
        """m canaries on distinct random coordinates with random signs; the coins come first
        from their own stream, so the number of IN canaries (records) is known before the
        model is (see :func:`included_count`)."""
        if not 1 <= m <= n_parameters:
            raise ValueError(
                f"finetune.audit_canaries must be between 1 and the {n_parameters} trainable "
                f"parameters, got {m}"
            )
        included = _coins(m, seed, inclusion)
        rng = np.random.default_rng([seed, _PLACEMENT_STREAM])
        coordinates = rng.choice(n_parameters, size=m, replace=False)
        signs = rng.choice([-1.0, 1.0], size=m)
        return cls(coordinates, signs, included, float(norm))

    @property
    def m(self) -> int:
        return int(self.coordinates.size)

    @property
    def n_included(self) -> int:
        return int(self.included.sum())

    def in_indices(self) -> np.ndarray:
        """Canary index of each IN canary, in record order (record N + j is IN canary j)."""
        return np.flatnonzero(self.included)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "kind": "dirac gradient canaries (white-box one-run audit)",
            "norm": self.norm,
            "coordinates": self.coordinates.tolist(),
            "signs": self.signs.tolist(),
            "included": self.included.tolist(),
            "scores": self.scores.tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> GradientCanaries:
        try:
            return cls(
                state["coordinates"],
                state["signs"],
                state["included"],
                float(state["norm"]),
                np.asarray(state["scores"], dtype=np.float64),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed gradient-canary file ({err})") from None

    def save(self, path) -> None:
        write_json(path, self.state_dict())

    @classmethod
    def load(cls, path) -> GradientCanaries:
        return cls.from_state_dict(read_json(path))


class CanaryInjector:
    """Puts sampled canaries' gradients into a step and reads the released coordinates back.

    Works on the loop's trainable parameters in their order (the same order the canaries'
    flat coordinates index).
    """

    def __init__(self, canaries: GradientCanaries, params: Sequence[torch.nn.Parameter]) -> None:
        self.canaries = canaries
        self.params = list(params)
        sizes = [p.numel() for p in self.params]
        total = self._total = sum(sizes)
        if canaries.coordinates.max(initial=-1) >= total:
            raise ValueError("a canary coordinate lies outside the trainable parameters")
        offsets = np.cumsum([0, *sizes])
        owner = np.searchsorted(offsets, canaries.coordinates, side="right") - 1
        self._local = canaries.coordinates - offsets[owner]  # flat index inside that parameter
        self._mine = [np.flatnonzero(owner == i) for i in range(len(self.params))]  # per param
        # per (parameter, device): the flat indices of its canaries' coordinates, on that device
        self._index: dict[tuple[int, torch.device], torch.Tensor] = {}

    def rows(self, canary_ids: np.ndarray) -> torch.Tensor:
        """(n, T) float32 per-sample gradients of the given canaries over every parameter side
        by side (T: all their entries, in order), made on the parameters' device with only the
        n nonzero entries crossing from the host: the rows the mechanism clips (or, without
        per-sample clipping, sums) like every other record's."""
        device = self.params[0].device
        rows = torch.zeros((len(canary_ids), self._total), dtype=torch.float32, device=device)
        if len(canary_ids):
            values = self.canaries.norm * self.canaries.signs[canary_ids]
            index = torch.as_tensor(
                np.stack([np.arange(len(canary_ids)), self.canaries.coordinates[canary_ids]])
            ).to(device)
            rows[index[0], index[1]] = torch.as_tensor(values, dtype=torch.float32).to(device)
        return rows

    @torch.no_grad()
    def observe(self) -> None:
        """Add sign * released gradient at each canary's coordinate to its score (read from the
        device in one copy, not one per parameter: each copy waits for the GPU)."""
        owners, picked = [], []
        for i, (p, mine) in enumerate(zip(self.params, self._mine, strict=True)):
            if mine.size and p.grad is not None:
                key = (i, p.grad.device)
                if key not in self._index:
                    self._index[key] = torch.as_tensor(self._local[mine], device=p.grad.device)
                owners.append(mine)
                picked.append(p.grad.reshape(-1)[self._index[key]].double())
        values = np.zeros(self.canaries.m)
        if picked:
            values[np.concatenate(owners)] = torch.cat(picked).cpu().numpy()
        self.canaries.scores += self.canaries.signs * values
