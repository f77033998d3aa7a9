"""RLDP's action bounds, at their corners (issue 21): whatever its policy outputs, a threshold
stays within clip_bounds x C / sqrt(K) and the noise within noise_bounds x the budget-paced z.

The expected values are computed here from the documented mapping (a unit cube onto log
bounds), not read back from the controller.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.control import Action, ControllerContext, build_controller
from privtune.errors import ConfigError

CTX = ControllerContext(
    group_names=("a", "b"),
    sample_rate=0.1,
    total_steps=100,
    target_epsilon=2.0,
    delta=1e-5,
    calibrated_noise=1.3,
    seed=0,
    expected_batch_size=10.0,
)
BOUNDS = {"clip": 2.0, "clip_bounds": (0.25, 4.0), "noise_bounds": (0.5, 3.0), "rl_interval": 5}
SPLIT = 2.0 / math.sqrt(2)  # C / sqrt(K)


@functools.cache
def _controller():
    return build_controller("rldp", CTX, BOUNDS)


def test_the_corners_of_the_action_cube_are_the_bounds() -> None:
    rldp = _controller()
    z = rldp.budget_noise()
    assert z == pytest.approx(1.3)  # nothing spent yet: the calibrated z
    low = rldp._decode(np.array([-1.0, -1.0, -1.0]))
    high = rldp._decode(np.array([1.0, 1.0, 1.0]))
    middle = rldp._decode(np.array([0.0, 1.0, 0.0]))
    assert low.clip_thresholds == pytest.approx((0.25 * SPLIT, 0.25 * SPLIT), rel=1e-12)
    assert low.noise_multiplier == pytest.approx(0.5 * z, rel=1e-12)
    assert high.clip_thresholds == pytest.approx((4.0 * SPLIT, 4.0 * SPLIT), rel=1e-12)
    assert high.noise_multiplier == pytest.approx(3.0 * z, rel=1e-12)
    # a residual of 0 is the anchor (the split threshold at the paced z), whatever the bounds
    assert middle.clip_thresholds == pytest.approx((SPLIT, 4.0 * SPLIT), rel=1e-12)
    assert middle.noise_multiplier == pytest.approx(z, rel=1e-12)
    # half-way residuals are the geometric half-way points on each side of the anchor
    half = rldp._decode(np.array([-0.5, 0.5, 0.5]))
    assert half.clip_thresholds == pytest.approx((0.5 * SPLIT, 2.0 * SPLIT), rel=1e-12)
    assert half.noise_multiplier == pytest.approx(math.sqrt(3.0) * z, rel=1e-12)


def test_the_start_is_the_split_threshold_at_the_paced_noise() -> None:
    rldp = build_controller("rldp", CTX, BOUNDS)
    first = rldp.act(None)
    assert first.clip_thresholds == pytest.approx((SPLIT, SPLIT), rel=1e-6)
    assert first.noise_multiplier == pytest.approx(1.3, rel=1e-6)
    assert rldp.reserve_noise() == pytest.approx(3.0 * 1.3, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.floats(-1.0, 1.0), st.floats(-1.0, 1.0))
def test_a_larger_residual_never_gives_a_smaller_threshold_or_noise(u: float, v: float) -> None:
    rldp = _controller()
    lo, hi = sorted((u, v))
    small, large = rldp._decode(np.array([lo, lo, lo])), rldp._decode(np.array([hi, hi, hi]))
    assert small.clip_thresholds[0] <= large.clip_thresholds[0]
    assert small.noise_multiplier <= large.noise_multiplier


def test_the_last_interval_asks_for_the_least_noise() -> None:
    rldp = build_controller("rldp", CTX, BOUNDS)
    rldp._step = CTX.total_steps - 5  # the next interval (5 steps) ends the run
    last = rldp._decode(np.array([1.0, 1.0, 1.0]))
    assert last.noise_multiplier == pytest.approx(0.5 * rldp.budget_noise(), rel=1e-12)
    assert last.clip_thresholds == pytest.approx((4.0 * SPLIT,) * 2, rel=1e-12)
    rldp._step = CTX.total_steps - 6  # one step more to go: not the last interval
    assert rldp._decode(np.array([1.0, 1.0, 1.0])).noise_multiplier == pytest.approx(
        3.0 * rldp.budget_noise(), rel=1e-12
    )


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1.0, 1.0), min_size=3, max_size=3))
def test_any_policy_output_decodes_within_the_bounds(vector: list[float]) -> None:
    rldp = _controller()
    action = rldp._decode(np.array(vector))
    z = rldp.budget_noise()
    for clip in action.clip_thresholds:
        assert 0.25 * SPLIT * (1 - 1e-12) <= clip <= 4.0 * SPLIT * (1 + 1e-12)
    assert 0.5 * z * (1 - 1e-12) <= action.noise_multiplier <= 3.0 * z * (1 + 1e-12)
    assert action.count_levels == () and action.count_noise is None  # no histogram by default


@pytest.mark.parametrize(
    "bounds",
    [
        {"clip_bounds": (2.0, 2.0)},  # low > 1: excludes the anchor
        {"clip_bounds": (0.0, 2.0)},
        {"clip_bounds": (3.0, 2.0)},
        {"noise_bounds": (1.2, 1.5)},  # the anchor (factor 1) must lie within the bounds
        {"noise_bounds": (0.0, 1.5)},
        {"noise_bounds": (1.5, 0.8)},
    ],
)
def test_empty_or_non_positive_bounds_are_refused(bounds: dict) -> None:
    with pytest.raises(ConfigError, match="bounds"):
        build_controller("rldp", CTX, bounds)


def test_pacing_ignores_an_interval_without_finite_noise() -> None:
    """The pace counts only intervals run at a real (finite, positive) noise multiplier."""
    from tests.test_rldp import _obs

    ctx = dataclasses.replace(CTX, total_steps=40)
    for z in (0.0, math.inf, math.nan):
        rldp = build_controller("rldp", ctx, BOUNDS)
        rldp._track(_obs(10, action=Action((1.0, 1.0), z)))
        assert rldp._used == 0.0 and rldp._step == 10
        # 30 of 40 steps left, nothing used: the rest may spend more per step (lower z)
        expected = 1 / math.sqrt(math.log1p(math.expm1(1 / 1.3**2) * 1.0 / (30 / 40)))
        assert rldp.budget_noise() == pytest.approx(expected, rel=1e-12)


def test_the_anchor_names_the_scaling_rule_of_every_action() -> None:
    """The default anchor is per-adapter AUTO-S: every action normalises with stability gamma;
    the clipping anchor clips, with no stability constant."""
    residual = np.array([0.3, -0.2, 0.1])
    auto_s = build_controller("rldp", CTX, {**BOUNDS, "gamma": 0.05})._decode(residual)
    assert (auto_s.scaling, auto_s.stability) == ("normalize", 0.05)
    clip = build_controller("rldp", CTX, {**BOUNDS, "anchor": "clip"})._decode(residual)
    assert (clip.scaling, clip.stability) == ("clip", 0.0)


def test_budget_pacing_follows_the_steps_run_at_each_admitted_noise() -> None:
    """The pace, by hand from budget_noise's rule: each step at z uses c(z) / c(z_cal) of one
    calibrated step's share (c(z) = e^(1/z^2) - 1); the rest of the budget over the steps left
    affords the z with c(z) = c(z_cal) (1 - used / total) / (left / total). An interval at no
    (or a non-finite) noise, or a step count that went back, uses nothing."""
    from types import SimpleNamespace

    def c(z: float) -> float:
        return math.expm1(1 / z**2)

    def pace(used: float, step: int) -> float:
        unused = max(1 - used / 100, 1e-2)
        left = max(100 - step, 1) / 100
        return 1 / math.sqrt(math.log1p(c(1.3) * unused / left))

    rldp = build_controller("rldp", CTX, BOUNDS)
    assert rldp.budget_noise() == pytest.approx(1.3, rel=1e-12)  # nothing run: the calibrated z
    used = 0.0
    for step, z in [(20, 2.0), (30, 0.9), (35, 0.0), (33, 1.0), (38, math.inf), (60, 1.1)]:
        if z > 0 and math.isfinite(z) and step > rldp._step:
            used += (step - rldp._step) * c(z) / c(1.3)
        rldp._track(SimpleNamespace(step=step, action=Action((1.0, 1.0), z)))
        assert rldp._step == step
        assert rldp.budget_noise() == pytest.approx(pace(used, step), rel=1e-12)
    rldp._track(SimpleNamespace(step=100, action=Action((1.0, 1.0), 1.3)))
    used += 40 * c(1.3) / c(1.3)
    assert rldp.budget_noise() == pytest.approx(pace(used, 100), rel=1e-12)  # 1 step "left"


def test_a_policy_failure_lets_the_anchor_act_and_is_counted(monkeypatch, caplog) -> None:
    """act's bookkeeping, decision by decision: the first decision (no observation yet) is the
    anchor; later ones track the interval and ask the policy; a policy that raises is logged,
    counted and replaced by the anchor, its transition skipped, and the observation's loss,
    spend and step are kept for the next decision either way."""
    import logging

    from privtune.control import Observation

    rldp = build_controller("rldp", CTX, BOUNDS)
    first = rldp.act(None)
    assert rldp.decisions == 1 and np.array_equal(rldp.last_residual, rldp.anchor_action)
    assert first.noise_multiplier == pytest.approx(1.3, rel=1e-12)
    assert rldp._prev[0].dtype == np.float32 and not rldp._prev[0].any()

    def observed(step: int, valid: float) -> Observation:
        return Observation(
            step=step, total_steps=100, train_loss=2.0, loss_trend=0.0, valid_loss=valid,
            epsilon_spent=0.1 * step / 5, epsilon_target=2.0, clipped_fraction=0.5,
            norm_quantiles=((1.0,) * 5,) * 2, norm_mean=(1.0, 1.0), norm_std=(0.1, 0.1),
            action=dataclasses.replace(first, noise_multiplier=2.0),  # louder than paced
        )  # fmt: skip

    before = rldp.budget_noise()
    policy = np.array([0.5, -0.5, 0.25], np.float32)
    seen: list = []
    monkeypatch.setattr(rldp, "_learn_and_act", lambda obs: seen.append(obs) or policy)
    rldp.act(observed(5, 3.0))
    assert seen == [observed(5, 3.0)]  # the policy sees the observation
    assert rldp.decisions == 2 and rldp.failures == 0 and rldp.last_residual is policy
    assert rldp._step == 5 and rldp.budget_noise() != before  # the interval was tracked
    assert (rldp._prev_valid, rldp._prev_eps, rldp._prev_step) == (3.0, 0.1, 5)

    def broken(obs):
        raise RuntimeError("critic diverged")

    monkeypatch.setattr(rldp, "_learn_and_act", broken)
    placeholder = rldp._prev[0]
    with caplog.at_level(logging.WARNING):
        rldp.act(observed(10, 2.5))
    assert rldp.decisions == 3 and rldp.failures == 1
    assert np.array_equal(rldp.last_residual, rldp.anchor_action)
    assert rldp._prev[0] is placeholder and np.array_equal(rldp._prev[1], rldp.anchor_action)
    assert rldp._skip_transition is True
    assert (rldp._prev_valid, rldp._prev_eps, rldp._prev_step) == (2.5, 0.2, 10)
    assert caplog.records[-1].getMessage() == (
        "RLDP policy failed (critic diverged); the anchor acts"
    )
    rldp.act(observed(15, 2.4))
    assert rldp.failures == 2  # counted, not just flagged
    # with no new observation (a resumed loop's first call), the anchor acts, nothing tracked
    assert rldp.act(None).noise_multiplier == pytest.approx(rldp.budget_noise(), rel=1e-12)
    assert rldp.decisions == 5 and rldp._step == 15


def test_a_calibrated_noise_below_the_overflow_cap_paces_at_the_cap() -> None:
    """e^(1/z^2) overflows a float for z below about 0.0375 (1/z^2 > 709), so a step's cost is
    capped at 1/z^2 = 700: a run calibrated to z = 0.01 (epsilon in the thousands) paces its
    first interval at the cap's z = 1/sqrt(700), finite, instead of raising OverflowError."""
    rldp = build_controller("rldp", dataclasses.replace(CTX, calibrated_noise=0.01), BOUNDS)
    assert rldp.budget_noise() == pytest.approx(1 / math.sqrt(700), rel=1e-12)
