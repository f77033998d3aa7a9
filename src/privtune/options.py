"""Typed options of every method (params.yaml ``methods.<entry>``), checked when params load.

One pydantic model per controller, so that a bad option is refused before any stage writes
anything, with its dotted name (``methods.rldp.rl_interval``), the value and the allowed range.
Kept apart from the controllers (which import torch, opacus, stable-baselines3) so that reading
params.yaml stays cheap. ``METHOD_OPTIONS`` maps a method name to its model; registering a new
controller (control.registry.register_controller) adds its model here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class MethodOptions(BaseModel):
    """Base: unknown options are refused, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(MethodOptions):
    pass


class DPSGDOptions(MethodOptions):
    clip: Positive = Field(1.0, description="flat L2 clipping threshold C")


class PerAdapterOptions(MethodOptions):
    clip: Positive = Field(1.0, description="flat threshold split over the adapters")
    weights: list[Positive] | None = Field(
        None, description="one weight per adapter: C_k = C w_k / ||w|| (default equal)"
    )


class QuantileOptions(MethodOptions):
    clip: Positive = Field(1.0, description="initial threshold")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="quantile of the norms to track")
    clip_lr: Positive = Field(0.2, description="geometric step of the threshold update")
    count_noise: Positive | None = Field(
        None, description="std of the noisy unclipped count (default: expected batch / 20)"
    )
    interval: int = Field(1, ge=1, description="steps between threshold updates")


class AutoSOptions(MethodOptions):
    gamma: Positive = Field(0.01, description="stability constant of g / (||g|| + gamma)")


class PSACOptions(MethodOptions):
    clip: Positive = 1.0
    r: Positive = Field(0.1, description="constant of the weight C / (||g|| + r / (||g|| + r))")


class DecayOptions(MethodOptions):
    schedule: Literal["linear", "exponential"] = "linear"
    end_ratio: float = Field(0.5, gt=0, le=1, description="last phase's noise / first phase's")
    phases: int = Field(5, ge=1, description="piecewise-constant phases of the schedule")
    clip: Positive = 1.0


class LMOOptions(MethodOptions):
    clip: Positive = Field(1.0, description="L1 clipping threshold over all LoRA parameters")
    params: dict[str, float] | None = Field(
        None, description="an explicit law: a1, a3, a4, k, theta, lam, a, b (lam is a rate)"
    )
    grid: Literal["paper", "extended"] = "paper"
    objective: Literal["std", "usefulness"] = "std"
    calibrate: bool | None = Field(None, description="scale the law to spend the target")
    cache: str | None = Field(None, description="JSON file caching law searches per plan")


class RLDPOptions(MethodOptions):
    rl_interval: int = Field(5, ge=1, description="steps between the policy's decisions")
    anchor: Literal["auto_s", "clip"] = Field(
        "auto_s", description="the anchor's per-adapter scaling: AUTO-S normalising or clipping"
    )
    gamma: Positive = Field(0.01, description="AUTO-S stability constant of the anchor")
    policy: bool = Field(True, description="false: the anchor alone (ablation)")
    warmup_intervals: int = Field(0, ge=0, description="random actions before the policy acts")
    explore: float = Field(1.0, ge=0, description="exploration, as a multiple of SAC's std")
    explore_decay: Positive = Field(
        32.0, description="critic updates over which exploration falls by 1/sqrt(2)"
    )
    fallback_margin: float = Field(
        0.0, description="the critic's value of the policy's action must beat the anchor's by"
    )
    reward_scale: Positive = Field(100.0, description="multiplies the validation-loss gain")
    sac_updates: int = Field(4, ge=0, description="SAC gradient steps per decision")
    sac_batch_size: int = Field(8, ge=1)
    buffer_size: int = Field(2000, ge=1)
    learning_rate: Positive = 1e-3
    clip_bounds: tuple[Positive, Positive] = Field(
        (2 / 3, 1.5), description="thresholds' range, as multiples of the anchor's (C / sqrt(K))"
    )
    noise_bounds: tuple[Positive, Positive] = Field(
        (0.9, 1.1), description="noise range, as multiples of the budget-paced z"
    )
    clip: Positive = Field(1.0, description="flat threshold C whose equal split is the anchor")
    groups: Literal["adapter", "projection", "flat"] = Field(
        "adapter",
        description="what has a threshold of its own: each LoRA adapter, each projection "
        "across layers (q_proj, ..., down_proj), or all as one",
    )
    # Off by default: over 283 steps the histogram cost more than the policy returned at every
    # epsilon measured (README, "Longer runs"); [0.5, 1, 2] lets the policy see gradient norms.
    norm_levels: tuple[Positive, ...] = Field(
        (), description="levels of the DP norm histogram the policy observes ([] = none)"
    )
    norm_noise: Positive = Field(0.25, description="count noise, as a fraction of the batch")
    valid_records: int = Field(8, ge=1, description="validation records before a decision")
    warm_start: str | None = Field(None, description="a controller.pt to start the policy from")


METHOD_OPTIONS: dict[str, type[MethodOptions]] = {
    "nonprivate": NoOptions,
    "dpsgd": DPSGDOptions,
    "per_adapter": PerAdapterOptions,
    "quantile": QuantileOptions,
    "auto_s": AutoSOptions,
    "psac": PSACOptions,
    "decay": DecayOptions,
    "lmo": LMOOptions,
    "rldp": RLDPOptions,
}
