"""The DP step's phases, shared by every noise law (after opacus' DPOptimizer).

A :class:`Mechanism` owns one kind of step: ``admit`` turns the budget guard's admitted noise
into the mechanism's own parameters (a :class:`StepSpec`), ``accumulate`` clips or scales the
per-sample gradients of one physical micro-batch into a running sum, ``release`` adds the
noise once per logical batch and scales by the expected batch size, and ``ledger_entry``
describes the released step for the accountant. The privacy engine calls them in that order;
nothing else reads which mechanism a method uses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from privtune.privacy.action import Action
from privtune.privacy.distributed import Replica
from privtune.privacy.ledger import LedgerEntry

Group = list[torch.nn.Parameter]
# One accounting segment: (noise multiplier or LMO law, sample rate, steps).
Segment = tuple[Any, float, int]


@dataclass(frozen=True)
class StepSpec:
    """An admitted interval's step in the mechanism's terms.

    ``guard_noise`` is what the guard checks every step (never below what it admitted).
    """

    action: Action
    guard_noise: float


@dataclass
class StepStats:
    """What one released step tells the loop.

    ``norms`` are the per-sample, per-group gradient norms before clipping: logs only, not DP
    (a controller must not set thresholds from them). The ``*_dp`` fields are DP releases the
    ledger has paid for. ``metrics`` are the step's numbers for the logs (z, thresholds).
    """

    norms: torch.Tensor | None  # (B, K) on CPU; None when the mechanism has no per-sample view
    clipped_fraction: float
    unclipped_fraction_dp: float | None = None
    # (K, L) DP fractions of samples whose group-k norm is <= levels[l] * C_k
    norm_histogram_dp: np.ndarray | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class Mechanism(ABC):
    """One noise law's DP step over groups of parameters clipped jointly."""

    name: ClassVar[str]
    private: ClassVar[bool] = True
    # True: the step needs opacus' per-sample gradients (``p.grad_sample``).
    per_sample: ClassVar[bool] = True
    # The accountant that can compose it: None = any (the run's choice); "rdp" = RDP only.
    accounting: ClassVar[str | None] = None

    def __init__(self, groups: Sequence[Group], group_names: Sequence[str], seed: int) -> None:
        if not groups or any(not g for g in groups) or len(groups) != len(group_names):
            raise ValueError("every clipping group needs a name and at least one parameter")
        self.groups = [list(g) for g in groups]
        self.group_names = tuple(group_names)
        # each parameter's entries, in order: the slices of the side-by-side vector (T of them)
        self._sizes = [p.numel() for group in self.groups for p in group]
        # Noise comes from a CPU generator so CPU and CUDA runs draw identical noise (and every
        # replica of a distributed run the same draw: privacy.distributed).
        self.generator = torch.Generator().manual_seed(seed)
        self.replica = Replica()  # the engine sets it for a distributed run

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.groups for p in group]

    @abstractmethod
    def admit(self, action: Action, noise: float) -> StepSpec:
        """The step for an interval whose noise knob the guard admitted at ``noise``."""

    @abstractmethod
    def accumulate(
        self,
        spec: StepSpec,
        extra_rows: torch.Tensor | None = None,
        records: int | None = None,
    ) -> None:
        """Fold one micro-batch into the running sum; ``extra_rows`` (rows, T) are per-sample
        gradients over every parameter side by side, in the mechanism's order, of records that
        have no forward pass (the audit's canaries); ``records``: the micro-batch's records that
        had one (the loop always says; None, in unit tests of a mechanism, takes whatever was
        captured)."""

    def width(self) -> int:
        """T: the parameters' entries side by side (the columns of ``extra_rows``)."""
        return sum(self._sizes)

    def check_extra_rows(self, extra_rows: torch.Tensor) -> None:
        """A canary on other coordinates would be clipped, noised and audited wrongly."""
        if extra_rows.dim() != 2 or extra_rows.shape[1] != self.width():
            raise ValueError(
                f"extra_rows must be one (rows, T) tensor over every parameter side by side, "
                f"T = {self.width()}: got shape {tuple(extra_rows.shape)}"
            )

    def write_grads(self, flat: torch.Tensor) -> None:
        """Each parameter's ``p.grad`` from its slice of ``flat`` (T,), in its own dtype: one
        operation a parameter, after the step's arithmetic was done on the whole vector."""
        for p, part in zip(self.parameters, flat.split(self._sizes), strict=True):
            p.grad = part.view_as(p).to(p.dtype)

    @abstractmethod
    def release(self, spec: StepSpec, expected_batch_size: float, batch_size: int) -> StepStats:
        """Noise the summed gradient once into ``p.grad`` and scale it; reset the sum."""

    def ledger_entry(
        self, spec: StepSpec, step: int, sample_rate: float, batch_size: int
    ) -> LedgerEntry | None:
        """The released step as the accountant composes it (None: nothing to account)."""
        return None

    def summary(self, calibrated_noise: float) -> dict[str, float]:
        """What the run's metrics say about the noise (beside epsilon)."""
        return {}

    def segment(self, noise: float, sample_rate: float, steps: int) -> Segment:
        """The accounting segment of ``steps`` steps at noise knob ``noise`` (for the guard)."""
        return (noise, sample_rate, steps)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class PerSampleClipping(Mechanism):
    """Bounds each sample's gradient per group before summing (the shared accumulate phase).

    Subclasses choose the norm (L2 or L1) and the per-sample factor; the running sum and the
    batch's norms live here until ``release`` uses them.
    """

    # The norm a sample's group gradient is bounded in: 2 (L2) or 1 (L1, LMO-DP).
    norm_ord: ClassVar[float] = 2.0

    def __init__(self, groups: Sequence[Group], group_names: Sequence[str], seed: int) -> None:
        super().__init__(groups, group_names, seed)
        self._widths = [sum(p.numel() for p in group) for group in self.groups]
        # The running sum of the clipped per-sample gradients, all parameters side by side in
        # float32 (released into p.grad), and each micro-batch's norms.
        self._sum: torch.Tensor | None = None
        self._norms: list[torch.Tensor] = []

    def side_by_side(
        self, extra_rows: torch.Tensor | None = None, records: int | None = None
    ) -> torch.Tensor:
        """(B, T) float32: each sample's gradient over every parameter, the groups' columns in
        order, with ``extra_rows`` (the audit's canaries) as further samples. One matrix makes
        the clipping a few operations a group instead of a few a parameter: launching those is
        most of its cost on a GPU (SmolLM2's LoRA has 420 matrices)."""
        params = self.parameters
        captured = [getattr(p, "grad_sample", None) for p in params]
        missing = next((p for p, g in zip(params, captured, strict=True) if g is None), None)
        canaries_only = extra_rows is not None and all(g is None for g in captured)
        if missing is not None and (records or not canaries_only):
            raise RuntimeError(
                f"no per-sample gradient for a trainable parameter of shape "
                f"{tuple(missing.shape)}: the per-sample hooks did not capture it (is the module "
                "supported and in training mode?); without it the adapter would silently not learn"
            )
        rows = {g.shape[0] for g in captured if g is not None}
        if records is not None and missing is None and rows != {records}:
            # a row per token (a module fed (T, N, d) or (N*T, d)) would be clipped alone:
            # one record's gradient could reach T times the threshold the ledger accounts
            raise RuntimeError(
                f"per-sample gradients of {sorted(rows)} rows for a micro-batch of {records} "
                "records: a trainable module does not see its input batch first, so clipping "
                "would not bound each record; use a model whose adapted layers take (batch, ...)"
            )
        if extra_rows is not None:
            self.check_extra_rows(extra_rows)
        blocks = []
        if missing is None:
            blocks.append(torch.cat([g.float().flatten(1) for g in captured], dim=1))
            for p in params:  # the matrix holds them now: not two copies at the peak
                p.grad_sample = None
        if extra_rows is not None:
            device = blocks[0].device if blocks else params[0].device
            blocks.append(extra_rows.float().to(device))
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def per_sample_norms(self, columns: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, K) norm of each sample's gradient restricted to each group (``columns``: the
        side-by-side matrix split by group), in float32."""
        norms = [torch.linalg.vector_norm(c, ord=self.norm_ord, dim=1) for c in columns]
        return torch.stack(norms, dim=1)

    @abstractmethod
    def factors(self, norms: torch.Tensor, spec: StepSpec) -> torch.Tensor:
        """(B, K) factors bounding each sample's group k by its threshold."""

    def accumulate(
        self,
        spec: StepSpec,
        extra_rows: torch.Tensor | None = None,
        records: int | None = None,
    ) -> None:
        columns = self.side_by_side(extra_rows, records).split(self._widths, dim=1)  # by group
        norms = self.per_sample_norms(columns)
        factors = self.factors(norms, spec).float()  # (B, K)
        # sum_i factor_ik * g_ik: one matrix-vector product a group
        parts = [factors[:, k] @ c for k, c in enumerate(columns)]
        clipped = parts[0] if len(parts) == 1 else torch.cat(parts)
        self._sum = clipped if self._sum is None else self._sum.add_(clipped)
        self._norms.append(norms.detach())

    def take_sum(self, thresholds: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The running sum (T,) float32, all parameters side by side (zeros for an empty
        batch), the batch's norms (on CPU) and the fraction of per-group norms above their
        threshold; the sum is reset. In a distributed run, the sum and the norms are every
        replica's together. The release adds noise to it and scales it whole, then
        ``write_grads``: a few operations a step instead of a few a parameter (SmolLM2's LoRA
        has 420 matrices; launching those is the cost on a GPU)."""
        if self._norms:
            total = self._sum
            norms = torch.cat(self._norms)
        else:  # a Poisson batch can be empty: the step is then noise alone (still accounted)
            params = self.parameters
            total = torch.zeros(self.width(), device=params[0].device)
            for p in params:
                p.grad_sample = None
            norms = torch.zeros(0, len(self.groups))
        if self.replica.distributed:
            self.replica.sum_([total])
            norms = self.replica.gather_rows(norms)
        norms = norms.cpu()  # the one copy from the device a step needs (the logs read them)
        if norms.numel():
            limits = torch.tensor(thresholds, dtype=norms.dtype)
            clipped = (norms > limits).float().mean().item()
        else:
            clipped = 0.0
        self._sum = None
        self._norms = []
        return total, norms, clipped

    def scale(self, total: torch.Tensor, expected_batch_size: float) -> None:
        """The noised sum over the public expected batch size, into ``p.grad``."""
        self.write_grads(total.div_(expected_batch_size))
