"""The clipping and noise baselines: each one's defining behaviour, and one accounting contract
for every private method (the ledger composes to the reported epsilon, at most the target)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule

from privtune.control import Action, ControllerContext, Observation, build_controller
from privtune.control.registry import CONTROLLERS
from privtune.control.schedules import decay_profile
from privtune.errors import ConfigError
from privtune.modeling import attach_lora
from privtune.privacy import accountant
from privtune.privacy.guard import BudgetGuard
from privtune.privacy.ledger import LedgerEntry, PrivacyLedger
from privtune.privacy.mechanisms import (
    Gaussian,
    effective_noise_multiplier,
    gradient_noise_multiplier,
    uniform_noise_stds,
)
from privtune.train import train
from tests.conftest import release_step
from tests.test_train import PARAMS, _data

# Five steps, accounted by RDP, logged once: accounting dominates a tiny run's time. The
# guard's PRV path is the same code.
RDP_PARAMS = PARAMS.model_copy(
    update={"accountant": "rdp", "epochs": 0.5, "log_every": 100, "eval_every": 100}
)


def _ctx(**changes) -> ControllerContext:
    base = ControllerContext(
        group_names=("a", "b", "c", "d"),
        sample_rate=0.05,
        total_steps=40,
        target_epsilon=2.0,
        delta=1e-5,
        calibrated_noise=1.0,
        seed=0,
        expected_batch_size=40.0,
        accountant="rdp",
    )
    return dataclasses.replace(base, **changes)


def _obs(**changes) -> Observation:
    base = Observation(
        step=1,
        total_steps=40,
        train_loss=5.0,
        loss_trend=0.0,
        valid_loss=None,
        epsilon_spent=0.1,
        epsilon_target=2.0,
        clipped_fraction=0.5,
        norm_quantiles=((0.1, 0.2, 0.3, 0.4, 0.5),),
        norm_mean=(0.3,),
        norm_std=(0.1,),
        action=Action((1.0,), 1.0),
    )
    return dataclasses.replace(base, **changes)


# -- the mechanism: per-sample scaling rules and the noisy count ------------------------------


def _tiny_grads():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(6, 4) * 3, torch.randn(6, 2)
    direct = []
    for i in range(len(x)):
        model.zero_grad()
        ((model(x[i : i + 1]) - y[i : i + 1]) ** 2).sum().backward()
        direct.append([p.grad.clone() for p in model.parameters()])
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    gsm.zero_grad()
    ((gsm(x) - y) ** 2).sum().backward()
    return model, direct


@pytest.mark.parametrize(
    ("scaling", "stability", "weight"),
    [
        ("normalize", 0.01, lambda n: 1.5 / (n + 0.01)),
        ("psac", 0.1, lambda n: 1.5 / (n + 0.1 / (n + 0.1))),
    ],
)
def test_mechanism_scales_each_sample_by_the_rule(scaling, stability, weight):
    model, direct = _tiny_grads()
    params = list(model.parameters())
    mech = Gaussian([params], ["all"], seed=0)
    release_step(mech, [1.5], 1e-12, 1.0, 6, scaling=scaling, stability=stability)
    expected = [torch.zeros_like(p) for p in params]
    for sample in direct:
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in sample))
        for i, g in enumerate(sample):
            expected[i] += weight(norm) * g
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    z=st.floats(0.3, 20.0),
    ratio=st.floats(0.51, 50.0),
    clips=st.lists(st.floats(0.01, 5.0), min_size=1, max_size=5),
)
def test_count_and_gradient_compose_to_the_ledgers_z(z, ratio, clips):
    """Andrew et al. Thm 1: the gradient at z_grad and the count at sigma_b are one mechanism
    of multiplier z (sensitivity of the centred count: 1/2)."""
    count_std = ratio * z
    stds = uniform_noise_stds(clips, gradient_noise_multiplier(z, count_std))
    assert effective_noise_multiplier(clips, stds, count_std) == pytest.approx(z, rel=1e-9)
    assert gradient_noise_multiplier(z, count_std) > z  # the count costs gradient noise


def test_count_noise_too_small_for_the_step_is_refused():
    with pytest.raises(ValueError, match="count noise std"):
        gradient_noise_multiplier(2.0, 1.0)


def test_noisy_count_release_is_centred_scaled_and_noised():
    norms = torch.tensor([[0.1, 0.1], [0.5, 3.0], [2.0, 0.1], [0.2, 0.2], [0.3, 0.9]])
    clips = [1.0, 1.0]  # unclipped (every group within): samples 0, 3, 4
    mech = Gaussian([[torch.nn.Parameter(torch.zeros(1))]] * 2, ["a", "b"], seed=0)
    mech.generator.manual_seed(0)
    exact = mech.release_unclipped_count(norms, clips, 1e-9, expected=4.0)
    assert exact == pytest.approx((3 - 5 / 2) / 4.0 + 0.5)
    draws = np.array([mech.release_unclipped_count(norms, clips, 2.0, 4.0) for _ in range(4000)])
    assert draws.std() == pytest.approx(2.0 / 4.0, rel=0.05)
    assert draws.mean() == pytest.approx(exact, abs=0.03)
    empty = mech.release_unclipped_count(torch.zeros(0, 2), clips, 1e-9, expected=4.0)
    assert empty == pytest.approx(0.5)  # noise alone around the centre


def test_norm_histogram_release_counts_each_group_and_level():
    """RLDP's observation of the norms: per group k and level l, the noisy fraction of samples
    with ||g_k|| <= l * C_k, each count centred (sensitivity 1/2) and noised."""
    norms = torch.tensor([[0.1, 0.1], [0.5, 3.0], [2.0, 0.1], [0.2, 0.2], [0.3, 0.9]])
    clips, levels = [1.0, 0.5], [0.5, 1.0, 2.0]
    mech = Gaussian([[torch.nn.Parameter(torch.zeros(1))]] * 2, ["a", "b"], seed=0)
    mech.generator.manual_seed(0)
    exact = mech.release_norm_histogram(norms, clips, levels, 1e-9, expected=4.0)
    direct = np.array(
        [[float((norms[:, k] <= lv * clips[k]).sum()) for lv in levels] for k in range(2)]
    )
    np.testing.assert_allclose(exact, (direct - 5 / 2) / 4.0 + 0.5, atol=1e-6)
    draws = np.stack(
        [mech.release_norm_histogram(norms, clips, levels, 2.0, 4.0) for _ in range(3000)]
    )
    assert draws.std(axis=0) == pytest.approx(np.full((2, 3), 0.5), rel=0.08)
    # D counts of std sigma_b cost what one count of std sigma_b / sqrt(D) costs
    one = effective_noise_multiplier([1.0], [2.0], 3.0 / math.sqrt(6))
    assert effective_noise_multiplier([1.0], [2.0], 3.0, count_dims=6) == pytest.approx(one)
    z = gradient_noise_multiplier(0.8, 3.0, count_dims=6)
    assert effective_noise_multiplier([1.0], [z], 3.0, count_dims=6) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="sqrt"):
        gradient_noise_multiplier(2.0, 1.0, count_dims=6)


def test_ledger_reads_entries_saved_before_the_count_field(tmp_path):
    old = {
        "version": 1,
        "entries": [
            dict(
                step=0,
                sample_rate=0.1,
                noise_multiplier=1.0,
                clip_thresholds=[1.0],
                noise_stds=[1.0],
                batch_size=3,
            )
        ],
    }
    ledger = PrivacyLedger.from_state_dict(old)
    assert ledger.entries[0].count_noise_std is None
    ledger.record(LedgerEntry(1, 0.1, 1.0, (1.0,), (1.4,), 2, count_noise_std=0.8))
    ledger.save(tmp_path / "ledger.json")
    assert PrivacyLedger.load(tmp_path / "ledger.json").entries == ledger.entries


# -- per-adapter clipping ---------------------------------------------------------------------


def test_per_adapter_splits_the_flat_threshold():
    equal = build_controller("per_adapter", _ctx(), {"clip": 2.0}).act(None)
    assert equal.clip_thresholds == pytest.approx((1.0,) * 4)  # C / sqrt(K), K = 4
    weighted = build_controller("per_adapter", _ctx(), {"weights": [1, 1, 2, 4]}).act(None)
    clips = np.array(weighted.clip_thresholds)
    assert float((clips**2).sum()) == pytest.approx(1.0)  # same sensitivity as DP-SGD at C = 1
    np.testing.assert_allclose(clips / clips[0], [1, 1, 2, 4])
    with pytest.raises(ConfigError, match=r"methods.per_adapter.*4 positive numbers"):
        build_controller("per_adapter", _ctx(), {"weights": [1, 2]})


# -- adaptive quantile clipping ---------------------------------------------------------------


def test_quantile_update_is_geometric_in_the_released_fraction():
    controller = build_controller("quantile", _ctx(), {"clip": 1.0, "clip_lr": 0.2})
    first = controller.act(None)
    assert first.count_noise == pytest.approx(40.0 / 20)  # sigma_b = expected batch / 20
    assert first.noise_multiplier == 1.0  # the ledger's z; the loop derives z_grad from it
    shrunk = controller.act(_obs(unclipped_fraction_dp=0.9))
    assert shrunk.clip_thresholds[0] == pytest.approx(math.exp(-0.2 * (0.9 - 0.5)))
    grown = controller.act(_obs(unclipped_fraction_dp=0.1))
    assert grown.clip_thresholds[0] == pytest.approx(1.0)


def test_quantile_never_reads_the_raw_norm_statistics():
    a = build_controller("quantile", _ctx(), {})
    b = build_controller("quantile", _ctx(), {})
    a.act(None), b.act(None)
    plain = a.act(_obs(unclipped_fraction_dp=0.7))
    private_changed = b.act(
        _obs(
            unclipped_fraction_dp=0.7,
            clipped_fraction=0.0,
            train_loss=99.0,
            norm_quantiles=((9.0,) * 5,),
            norm_mean=(9.0,),
            norm_std=(4.0,),
        )
    )
    assert plain == private_changed


def test_quantile_tracks_the_target_quantile_from_noisy_counts():
    """Driven by the mechanism's DP release only, C settles near the true median norm."""
    rng = np.random.default_rng(0)
    controller = build_controller("quantile", _ctx(), {"clip": 0.1, "target_quantile": 0.5})
    mech = Gaussian([[torch.nn.Parameter(torch.zeros(1))]], ["all"], seed=0)
    mech.generator.manual_seed(1)
    action = controller.act(None)
    clips = []
    for _ in range(400):
        norms = torch.tensor(rng.lognormal(mean=0.0, sigma=0.5, size=(40, 1)))
        fraction = mech.release_unclipped_count(
            norms, action.clip_thresholds, action.count_noise, expected=40.0
        )
        action = controller.act(_obs(unclipped_fraction_dp=fraction))
        clips.append(action.clip_thresholds[0])
    assert np.median(clips[-100:]) == pytest.approx(1.0, rel=0.15)  # median of lognormal(0, .)


def test_quantile_in_the_loop_releases_the_count_at_the_ledgers_cost(tiny_model, tiny_tokenizer):
    train_data, valid_data = _data(tiny_tokenizer)
    model = attach_lora(tiny_model, RDP_PARAMS.lora)
    result = train(
        model,
        train_data,
        valid_data,
        RDP_PARAMS,
        "quantile",
        {"clip": 0.05, "interval": 2},
        show_progress=False,
    )
    z = result.plan.calibrated_noise
    for e in result.ledger.entries:
        assert e.noise_multiplier == pytest.approx(z)
        assert e.count_noise_std == pytest.approx(16 / 20)  # expected batch 16
        grad_z = gradient_noise_multiplier(z, e.count_noise_std)
        assert e.noise_stds[0] == pytest.approx(grad_z * e.clip_thresholds[0])
    clips = [e.clip_thresholds[0] for e in result.ledger.entries]
    assert clips[-1] > clips[0]  # a tiny start clips everything: the threshold grows
    assert "unclipped_fraction_dp" in result.history[0]
    # The threshold moves every interval but z does not: the ledger records the admitted z
    # exactly (the stds carry a rounding margin above it), so the run is one segment for the
    # accountant instead of one per step.
    assert len(result.ledger.segments()) == 1
    assert all(e.noise_multiplier == z for e in result.ledger.entries)
    for e in result.ledger.entries:  # ...and the noise actually drawn is at least that z
        actual = effective_noise_multiplier(e.clip_thresholds, e.noise_stds, e.count_noise_std)
        assert actual >= e.noise_multiplier


# -- the decaying schedule --------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "exponential"])
def test_decay_profiles_fall_from_one_to_the_end_ratio(schedule):
    profile = decay_profile(schedule, 0.25, 6)
    assert profile[0] == 1.0 and profile[-1] == pytest.approx(0.25)
    assert np.all(np.diff(profile) < 0)
    if schedule == "exponential":
        np.testing.assert_allclose(profile[1:] / profile[:-1], profile[1] / profile[0])


def _drive_decay(controller, ctx):
    """Run a decaying controller through the guard as the loop does; return admissions."""
    ledger = PrivacyLedger()
    guard = BudgetGuard(
        ledger=ledger,
        target_epsilon=ctx.target_epsilon,
        delta=ctx.delta,
        sample_rate=ctx.sample_rate,
        total_steps=ctx.total_steps,
        reserve_noise=controller.reserve_noise(),
        accountant=ctx.accountant,
    )
    admissions = []
    while len(ledger) < ctx.total_steps:
        action = controller.act(None)
        guard.reserve_noise = controller.reserve_noise()
        admission = guard.admit(action.noise_multiplier, controller.interval)
        admissions.append((action.noise_multiplier, admission))
        for _ in range(admission.steps):
            guard.check_step(admission.noise_multiplier)
            z = admission.noise_multiplier
            ledger.record(LedgerEntry(len(ledger), ctx.sample_rate, z, (1.0,), (z,), 1))
    return ledger, admissions


@pytest.mark.parametrize(
    ("schedule", "acc"),
    [
        ("linear", "rdp"),
        ("exponential", "rdp"),
        pytest.param("exponential", "prv", marks=pytest.mark.slow),
    ],
)
def test_decay_spends_the_target_without_the_guard_raising_its_noise(schedule, acc):
    ctx = _ctx(accountant=acc, total_steps=60, sample_rate=0.05)
    ctx = dataclasses.replace(
        ctx, calibrated_noise=accountant.calibrate_noise(2.0, 1e-5, 0.05, 60, acc)
    )
    controller = build_controller("decay", ctx, {"schedule": schedule, "phases": 4})
    assert controller.noises[0] / controller.noises[-1] == pytest.approx(2.0)  # end_ratio 0.5
    assert controller.noises[0] > ctx.calibrated_noise > controller.noises[-1]
    ledger, admissions = _drive_decay(controller, ctx)
    for requested, admission in admissions:
        assert not admission.raised and admission.noise_multiplier == requested
        # an honest reserve: at every admission the guard projects exactly the planned spending
        assert admission.projected_epsilon == pytest.approx(controller.planned_epsilon, rel=1e-3)
    spent = accountant.epsilon(ledger.segments(), ctx.delta, acc)
    assert 0.99 * ctx.target_epsilon <= spent <= ctx.target_epsilon


def test_decay_reserve_is_the_constant_spending_like_the_rest():
    ctx = _ctx(total_steps=60)
    ctx = dataclasses.replace(
        ctx, calibrated_noise=accountant.calibrate_noise(2.0, 1e-5, 0.05, 60, "rdp")
    )
    controller = build_controller("decay", ctx, {"phases": 4})
    segments = controller._segments(controller.noises)
    for phase in range(3):
        reserve = controller._reserve(phase)
        rest = controller.noises[phase + 1 :]
        assert min(rest) <= reserve <= max(rest)
        steps = sum(controller.lengths[phase + 1 :])
        projected = controller._epsilon([*segments[: phase + 1], (reserve, 0.05, steps)])
        assert projected == pytest.approx(controller.planned_epsilon, rel=1e-3)
        assert projected <= controller.planned_epsilon


def test_decay_in_the_loop_is_applied_as_planned(tiny_model, tiny_tokenizer):
    train_data, valid_data = _data(tiny_tokenizer)
    model = attach_lora(tiny_model, RDP_PARAMS.lora)
    result = train(
        model, train_data, valid_data, RDP_PARAMS, "decay", {"phases": 2}, show_progress=False
    )
    controller = result.controller
    planned = np.repeat(controller.noises, controller.lengths)
    recorded = [e.noise_multiplier for e in result.ledger.entries]
    np.testing.assert_allclose(recorded, planned, rtol=1e-9)  # the guard raised nothing
    assert 0.99 * RDP_PARAMS.epsilon <= result.epsilon <= RDP_PARAMS.epsilon


def test_decay_rejects_an_unknown_schedule():
    with pytest.raises(ConfigError, match=r"methods\.decay\.schedule.*'linear' or 'exponential'"):
        build_controller("decay", _ctx(), {"schedule": "cosine"})


# -- one accounting contract for every private method -----------------------------------------

PRIVATE_METHODS = sorted(
    name for name, cls in CONTROLLERS.items() if cls.private and not name.startswith("test-")
)


# Options that only make the tiny run cheaper (each decay phase is one accounted segment).
LIGHT_OPTIONS = {"decay": {"phases": 2}}
# (steps, epsilon) of each method's run below, recorded with the code before the privacy
# engine was introduced: a refactor of the loop must not change what any method spends.
PINNED = {
    "dpsgd": (5, 1.9980904546067548),
    "per_adapter": (5, 1.9980904546067548),
    "quantile": (5, 1.9980904546067548),
    "auto_s": (5, 1.9980904546067548),
    "psac": (5, 1.9980904546067548),
    "decay": (5, 1.9999838997933392),
    "lmo": (5, 1.9984125963127728),
    # re-pinned when RLDP's actions became residuals around its anchor (noise x0.9-1.1 of the
    # paced z instead of x0.8-1.5): the policy's actions changed, the loop did not
    "rldp": (5, 1.999957692187193),
}


def test_every_baseline_is_registered():
    expected = {"dpsgd", "per_adapter", "quantile", "auto_s", "psac", "decay", "rldp", "lmo"}
    assert expected <= set(PRIVATE_METHODS)


@pytest.mark.parametrize("method", PRIVATE_METHODS)
def test_every_private_method_ends_within_the_target_by_its_ledger(
    method, tiny_model, tiny_tokenizer
):
    train_data, valid_data = _data(tiny_tokenizer)
    model = attach_lora(tiny_model, RDP_PARAMS.lora)
    options = LIGHT_OPTIONS.get(method, {})
    result = train(model, train_data, valid_data, RDP_PARAMS, method, options, show_progress=False)
    ledger = result.ledger
    assert result.steps_taken == len(ledger) == result.plan.steps
    steps, epsilon = PINNED[method]
    assert (len(ledger), result.epsilon) == (steps, pytest.approx(epsilon, rel=1e-6))
    for e in ledger.entries:  # the recorded z is the step's noise, the counts' included:
        drawn = effective_noise_multiplier(
            e.clip_thresholds, e.noise_stds, e.count_noise_std, e.count_dims
        )
        # never more than was drawn (stds carry a 1e-9 rounding margin above the admitted z)
        assert e.noise_multiplier <= drawn <= e.noise_multiplier * (1 + 1e-8)
    # Gaussian ledgers compose as segments (PRV or RDP); LMO steps in RDP with their own bound.
    composed = accountant.ledger_epsilon(ledger, result.plan.delta, RDP_PARAMS.accountant)
    assert composed == pytest.approx(result.epsilon)
    assert composed <= RDP_PARAMS.epsilon
    assert math.isfinite(result.valid_loss)
