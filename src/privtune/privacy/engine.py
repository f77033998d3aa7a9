"""The privacy engine: the only way a training step touches noise.

It owns the plan, the mechanism, the ledger, the accountant and the budget guard (after
opacus' PrivacyEngine). The loop asks it to

- ``decide(proposal, steps=, reserve=)``: the guard admits the controller's proposal for the
  next ``steps`` steps, raising its noise if the run would overspend, and the mechanism turns
  the admitted noise into its step (``BudgetExhausted`` when nothing fits);
- ``accumulate(extra_rows)``: once per physical micro-batch, fold the per-sample gradients in;
- ``step(step, batch_size)``: guard check, noise once for the logical batch, ledger record, in
  that order and never skippable; then the release hooks (the white-box auditor) read the
  released gradient;
- ``finish()``: the final (epsilon, epsilon_rdp), asserted within the target.

A non-private mechanism has no ledger and no guard: the same calls then only sum and scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule

from privtune.errors import BudgetExhausted
from privtune.privacy import accountant as acc
from privtune.privacy.action import Action
from privtune.privacy.distributed import Replica
from privtune.privacy.guard import BudgetGuard
from privtune.privacy.ledger import PrivacyLedger
from privtune.privacy.lora_grad_sample import LoraGradSample, covers
from privtune.privacy.mechanisms import Mechanism, StepSpec, StepStats
from privtune.privacy.plan import TrainingPlan


@dataclass(frozen=True)
class PrivacySpent:
    epsilon: float
    epsilon_rdp: float  # the looser RDP conversion, reported beside
    delta: float
    accountant: str  # the accountant that composed `epsilon`
    metrics: dict[str, Any]  # the run's privacy metrics, as the finetune stage reports them


class PrivacyEngine:
    def __init__(
        self,
        *,
        plan: TrainingPlan,
        mechanism: Mechanism,
        target_epsilon: float,
        accountant: str = "pld",
        replica: Replica | None = None,
    ) -> None:
        self.plan = plan
        self.mechanism = mechanism
        self.replica = replica or Replica()
        mechanism.replica = self.replica
        self.target_epsilon = target_epsilon
        # LMO-DP composes in RDP only, whatever the run asked for (mechanism.accounting).
        self.accountant = mechanism.accounting or accountant
        self.ledger = PrivacyLedger() if mechanism.private else None
        self.guard = (
            BudgetGuard(
                ledger=self.ledger,
                target_epsilon=target_epsilon,
                delta=plan.delta,
                sample_rate=plan.sample_rate,
                total_steps=plan.steps,
                reserve_noise=plan.calibrated_noise,
                accountant=self.accountant,
                segment=mechanism.segment,
            )
            if mechanism.private
            else None
        )
        self._spec: StepSpec | None = None
        self._admitted: tuple[Action, float] | None = None  # (proposal, noise): to resume
        self._release_hooks: list[Callable[[], None]] = []
        self._lora_hooks: LoraGradSample | None = None

    @property
    def private(self) -> bool:
        return self.mechanism.private

    def wrap(self, model: torch.nn.Module, grad_sampler: str = "auto") -> torch.nn.Module:
        """The module to run forward passes through, with per-sample gradient hooks when the
        mechanism clips per sample: privtune's LoRA hooks where they cover every clipped
        parameter (``grad_sampler`` auto), else opacus' GradSampleModule."""
        if not self.mechanism.per_sample:
            return model
        if grad_sampler == "auto" and covers(model, self.mechanism.parameters):
            self._lora_hooks = LoraGradSample(model, self.mechanism.parameters)
            return model
        return GradSampleModule(model, batch_first=True, loss_reduction="sum")

    def attach_release_hook(self, hook: Callable[[], None]) -> None:
        """Called after every release, while ``p.grad`` holds the released (noisy) gradient."""
        self._release_hooks.append(hook)

    def decide(self, proposal: Action, *, steps: int, reserve: float) -> Action:
        """Admit ``proposal`` for the next ``steps`` steps; ``reserve`` is the noise the guard
        assumes for every later step. Returns the admitted action."""
        noise = 0.0
        if self.guard is not None:
            if not (reserve > 0 and math.isfinite(reserve)):
                raise ValueError(
                    f"controller.reserve_noise() must be finite and > 0, got {reserve}"
                )
            # The reserve may change as a schedule unfolds (a decaying one does); the guard's
            # bound holds whatever it is: the last admission sees the whole run.
            self.guard.reserve_noise = reserve
            noise = self.guard.admit(proposal.noise_multiplier, steps).noise_multiplier
        self._spec = self.mechanism.admit(proposal, noise)
        self._admitted = (proposal, noise)
        return self._spec.action

    def accumulate(
        self, extra_rows: torch.Tensor | None = None, records: int | None = None
    ) -> None:
        """Fold one micro-batch of ``records`` records (0: the audit's canaries alone) in;
        ``extra_rows``: (rows, T) gradients of records without a forward pass (canaries)."""
        self.mechanism.accumulate(self._current(), extra_rows, records)

    def step(self, step: int, batch_size: int) -> StepStats | None:
        """Release one logical batch of ``batch_size`` records (None: an empty non-private
        batch, nothing released)."""
        spec = self._current()
        if self.guard is not None:
            self.guard.check_step(spec.guard_noise)
        stats = self.mechanism.release(spec, self.plan.expected_batch_size, batch_size)
        if stats is None:
            return None
        entry = self.mechanism.ledger_entry(spec, step, self.plan.sample_rate, batch_size)
        if entry is not None:
            self.ledger.record(entry)
        for hook in self._release_hooks:
            hook()
        return stats

    def spent(self) -> float:
        """Epsilon of the ledger so far (public: it depends only on the schedule)."""
        return 0.0 if self.guard is None else self.guard.spent()

    def step_metrics(self, stats: StepStats) -> dict[str, float]:
        """A step's numbers for the logs: epsilon spent so far, then the mechanism's."""
        return {} if self.guard is None else {"epsilon": self.spent(), **stats.metrics}

    def finish(self, model: torch.nn.Module | None = None) -> PrivacySpent | None:
        """Final epsilon (None when non-private); detaches the per-sample hooks from ``model``."""
        if isinstance(model, GradSampleModule):
            model.to_standard_module()
        if self._lora_hooks is not None:
            self._lora_hooks.remove()
        if self.ledger is None:
            return None
        delta = self.plan.delta
        epsilon = acc.ledger_epsilon(self.ledger, delta, self.accountant)
        epsilon_rdp = acc.ledger_epsilon(self.ledger, delta, "rdp")
        metrics = {
            "target_epsilon": self.target_epsilon,
            "epsilon": epsilon,
            "epsilon_rdp": epsilon_rdp,
            "delta": delta,
            "mechanism": self.mechanism.name,
            "accountant": self.accountant,
            **self.mechanism.summary(self.plan.calibrated_noise),
        }
        spent = PrivacySpent(epsilon, epsilon_rdp, delta, self.accountant, metrics)
        if not spent.epsilon <= self.target_epsilon * (1 + 1e-9):  # NaN fails too
            raise BudgetExhausted(  # unreachable unless the guard is broken: fail loudly
                f"spent epsilon {spent.epsilon} exceeds the target {self.target_epsilon}"
            )
        return spent

    def state_dict(self) -> dict[str, Any]:
        """Ledger, guard, noise generator and the admitted interval: what a resumed run needs
        to continue the same releases and spend nothing twice."""
        return {
            "ledger": None if self.ledger is None else self.ledger.state_dict(),
            "guard": None if self.guard is None else self.guard.state_dict(),
            "mechanism": self.mechanism.state_dict(),
            "admitted": self._admitted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ledger is not None:
            self.ledger.entries[:] = PrivacyLedger.from_state_dict(state["ledger"]).entries
            self.guard.load_state_dict(state["guard"])
        self.mechanism.load_state_dict(state["mechanism"])
        self._admitted = state["admitted"]
        # the same proposal at the same admitted noise: the interval's step, exactly
        self._spec = None if self._admitted is None else self.mechanism.admit(*self._admitted)

    def _current(self) -> StepSpec:
        if self._spec is None:
            raise BudgetExhausted("no admitted action: call decide() before stepping")
        return self._spec
