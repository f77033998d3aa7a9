"""LMO-DP as a method of the one loop: L1 clipping, the noise the ledger claims, the ledger's
composition (alone and mixed with Gaussian steps), the guard, and a run within the target."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.special import comb

from privtune.control import build_controller
from privtune.errors import BudgetExhausted, ConfigError
from privtune.modeling import attach_lora
from privtune.privacy import accountant, lmo_accounting
from privtune.privacy.action import Action
from privtune.privacy.guard import BudgetGuard
from privtune.privacy.ledger import LedgerEntry, PrivacyLedger
from privtune.privacy.lmo import LMOParams, mean_abs_noise, noise_std, subsampled_rdp
from privtune.privacy.lmo_accounting import orders_up_to
from privtune.privacy.mechanisms import LMO
from privtune.train import train
from tests.conftest import release_step
from tests.test_baselines import RDP_PARAMS, _ctx
from tests.test_train import _data

PAPER_03 = LMOParams(a1=0.1, a3=0.1, a4=0.1, k=1.0, theta=0.5, lam=5.0, a=1.0, b=2.0)
# Inverse scale ~1e9: noise ~1e-9, so a step shows its clipped sum.
SILENT = LMOParams(a1=1.0, a3=1.0, a4=1e9, k=1.0, theta=1.0, lam=1.0, a=1.0, b=2.0)
Q, STEPS, DELTA = 0.1, 5, 1 / 1600


def _per_sample_grads():
    """A linear model's per-sample gradients (opacus) and the same computed one by one."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(7, 5) * 3, torch.randn(7, 3)
    direct = []
    for i in range(len(x)):
        model.zero_grad()
        ((model(x[i : i + 1]) - y[i : i + 1]) ** 2).sum().backward()
        direct.append(torch.cat([p.grad.flatten().clone() for p in model.parameters()]))
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    gsm.zero_grad()
    ((gsm(x) - y) ** 2).sum().backward()
    return model, torch.stack(direct)


# -- the mechanism ------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.5, 4.0, 1e4])
def test_l1_clipping_bounds_every_sample_and_sums_them(clip):
    model, direct = _per_sample_grads()
    params = list(model.parameters())
    # Two groups (weight, bias) are clipped JOINTLY in L1: the whole sample is bounded by C.
    mech = LMO([[params[0]], [params[1]]], ["weight", "bias"], seed=0, law=SILENT)
    stats = release_step(mech, [clip], 1.0, 1.0, batch_size=len(direct))
    l1 = direct.abs().sum(1)
    torch.testing.assert_close(stats.norms[:, 0], l1, rtol=1e-5, atol=1e-6)
    factors = (clip / l1).clamp(max=1.0)
    clipped = factors[:, None] * direct
    assert float(clipped.abs().sum(1).max()) <= clip * (1 + 1e-6)
    released = torch.cat([p.grad.flatten() for p in params])
    torch.testing.assert_close(released, clipped.sum(0), rtol=1e-4, atol=1e-5)
    assert stats.clipped_fraction == pytest.approx(float((l1 > clip).float().mean()))


def test_one_steps_noise_has_the_scale_the_ledger_claims():
    """Zero gradients, clip 2.5: the released gradient is the noise alone; its mean |n| and
    std match the library's formulas (clip * E[1/eps], clip * sqrt(2 E[1/eps^2]))."""
    clip, expected = 2.5, 4.0
    weight = torch.nn.Parameter(torch.zeros(400, 500))
    weight.grad_sample = torch.zeros(3, 400, 500)  # three samples, zero gradients
    mech = LMO([[weight]], ["weight"], seed=7, law=PAPER_03)
    release_step(mech, [clip], 1.0, expected, batch_size=3)
    noise = weight.grad.double().flatten() * expected  # undo the division by the batch size
    assert float(noise.abs().mean()) == pytest.approx(mean_abs_noise(PAPER_03, clip), rel=0.02)
    assert float(noise.std()) == pytest.approx(noise_std(PAPER_03, clip), rel=0.03)
    assert abs(float(noise.mean())) < 5 * float(noise.std()) / math.sqrt(noise.numel())
    # The same seed draws the same noise (the Gaussian path's generator discipline).
    again = torch.nn.Parameter(torch.zeros(400, 500))
    again.grad_sample = torch.zeros(3, 400, 500)
    release_step(LMO([[again]], ["weight"], seed=7, law=PAPER_03), [clip], 1.0, expected, 3)
    assert torch.equal(again.grad, weight.grad)
    with pytest.raises(ValueError, match="L1 clipping threshold"):
        mech.admit(Action((0.0,), 1.0), 1.0)


# -- the subsampling bound ----------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_subsampled_bound_is_zhu_wangs_general_bound_for_laplace(scale):
    """Laplace meets Zhu & Wang's Theorem 8 condition, so their Theorem 6 sum is its exact
    subsampled RDP; the general bound (Theorem 5) lies between it and it + log(3)/(alpha-1),
    with equality at alpha = 2 (no factor 3 below l = 3)."""
    q, orders = 0.05, orders_up_to(40)
    alpha = orders.astype(float)
    base = np.log(
        alpha / (2 * alpha - 1) * np.exp((alpha - 1) / scale)
        + (alpha - 1) / (2 * alpha - 1) * np.exp(-alpha / scale)
    ) / (alpha - 1)
    exact = []
    for a in orders:
        terms = (1 - q) ** (a - 1) * (a * q - q + 1)
        for ell in range(2, a + 1):
            eps_l = base[ell - 2]
            terms += comb(a, ell) * q**ell * (1 - q) ** (a - ell) * math.exp((ell - 1) * eps_l)
        exact.append(math.log(terms) / (a - 1))
    exact = np.array(exact)
    ours = subsampled_rdp(base, q)
    assert np.all(ours >= exact * (1 - 1e-9))
    assert np.all(ours <= exact + math.log(3) / (alpha - 1) + 1e-12)
    assert ours[0] == pytest.approx(exact[0], rel=1e-12)
    assert ours[-1] > exact[-1] * (1 + 1e-6)  # the factor 3 is there


# -- the ledger and the accountant --------------------------------------------------------------


def _lmo_entry(step, law=PAPER_03, q=Q, clip=1.0):
    std = noise_std(law)
    return LedgerEntry(
        step, q, std, (clip,), (std * clip,), 16, mechanism="lmo", lmo_params=law.to_dict()
    )


def test_lmo_ledger_composes_with_the_sound_bound_and_round_trips(tmp_path):
    ledger = PrivacyLedger()
    for step in range(STEPS):
        ledger.record(_lmo_entry(step))
    expected = lmo_accounting.epsilon(PAPER_03, Q, STEPS, DELTA)
    assert accountant.ledger_epsilon(ledger, DELTA) == pytest.approx(expected, rel=1e-12)
    assert ledger.split_segments() == ([], [(PAPER_03, Q, STEPS)])
    ledger.save(tmp_path / "ledger.json")
    loaded = PrivacyLedger.load(tmp_path / "ledger.json")
    assert loaded.entries == ledger.entries
    assert accountant.ledger_epsilon(loaded, DELTA) == pytest.approx(expected, rel=1e-12)


def test_mixed_ledger_composes_in_rdp():
    ledger = PrivacyLedger()
    for step in range(3):
        ledger.record(LedgerEntry(step, Q, 1.5, (1.0,), (1.5,), 16))
    for step in range(3, 3 + STEPS):
        ledger.record(_lmo_entry(step))
    with pytest.raises(ValueError, match="ledger_epsilon"):
        ledger.segments()  # a Gaussian-only view would drop the LMO steps
    orders = orders_up_to(128)
    rdp = compute_rdp(q=Q, noise_multiplier=1.5, steps=3, orders=orders)
    rdp = rdp + lmo_accounting.segment_rdp(PAPER_03, Q, STEPS)
    by_hand, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    mixed = accountant.ledger_epsilon(ledger, DELTA)
    assert mixed == pytest.approx(by_hand, rel=1e-12)
    assert mixed > lmo_accounting.epsilon(PAPER_03, Q, STEPS, DELTA)
    assert mixed > accountant.epsilon([(1.5, Q, 3)], DELTA, "rdp")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lmo_params": None}, "needs its lmo_params"),
        ({"lmo_params": {"a1": 0.1}}, "malformed lmo_params"),
        ({"mechanism": "laplace"}, "unknown noise mechanism"),
        ({"mechanism": "gaussian"}, "must not carry lmo_params"),
    ],
)
def test_malformed_ledger_entries_are_refused(change, message, tmp_path):
    entry = dataclasses.replace(_lmo_entry(0), **change)
    with pytest.raises(ValueError, match=message):
        PrivacyLedger().record(entry)
    state = {"version": 1, "entries": [dataclasses.asdict(entry)]}
    with pytest.raises(ValueError, match=message):
        PrivacyLedger.from_state_dict(state)


# -- the guard ----------------------------------------------------------------------------------


def _guard(ledger, law, target):
    return BudgetGuard(
        ledger=ledger,
        target_epsilon=target,
        delta=DELTA,
        sample_rate=Q,
        total_steps=STEPS,
        reserve_noise=1.0,
        accountant="rdp",
        segment=LMO([[torch.nn.Parameter(torch.zeros(1))]], ["w"], 0, law=law).segment,
    )


def test_guard_raises_lmo_noise_that_would_overspend_and_stops_when_nothing_fits():
    target = lmo_accounting.epsilon(PAPER_03, Q, STEPS, DELTA)  # the law spends it exactly
    ledger = PrivacyLedger()
    guard = _guard(ledger, PAPER_03, target)
    admitted = guard.admit(0.25, 2)  # a quarter of the noise: would overspend
    assert admitted.raised and admitted.noise_multiplier > 0.25
    assert admitted.projected_epsilon <= target
    with pytest.raises(BudgetExhausted, match="below the admitted"):
        guard.check_step(0.25)
    while len(ledger) < STEPS:
        if len(ledger) == guard._allowed_until:
            admitted = guard.admit(0.25, 2)
        guard.check_step(admitted.noise_multiplier)
        law = PAPER_03.with_noise_level(admitted.noise_multiplier)
        ledger.record(_lmo_entry(len(ledger), law))
    assert accountant.ledger_epsilon(ledger, DELTA) <= target * (1 + 1e-9)
    # A ledger that already spent more than the whole budget admits nothing.
    spent = PrivacyLedger([_lmo_entry(i, PAPER_03.with_noise_level(0.1)) for i in range(2)])
    with pytest.raises(BudgetExhausted):
        _guard(spent, PAPER_03, target).admit(1.0, 1)


# -- the controller and the loop ----------------------------------------------------------------


def test_explicit_law_is_used_as_given_or_refused_when_it_overspends():
    ctx = _ctx(total_steps=STEPS, sample_rate=Q, delta=DELTA, target_epsilon=2.0)
    noisy = PAPER_03.with_noise_level(2.0)
    controller = build_controller("lmo", ctx, {"params": noisy.to_dict(), "clip": 0.5})
    assert controller.lmo_params == noisy
    assert controller.planned_epsilon == pytest.approx(
        lmo_accounting.epsilon(noisy, Q, STEPS, DELTA)
    )
    assert controller.act(None).clip_thresholds == (0.5,)
    with pytest.raises(ConfigError, match="above the target"):
        build_controller("lmo", ctx, {"params": PAPER_03.with_noise_level(0.1).to_dict()})
    calibrated = build_controller("lmo", ctx, {"params": noisy.to_dict(), "calibrate": True})
    assert 0.99 * 2.0 <= calibrated.planned_epsilon <= 2.0
    with pytest.raises(ConfigError, match=r"methods.lmo.*missing a, b, lam, theta"):
        build_controller("lmo", ctx, {"params": {k: 1.0 for k in ("a1", "a3", "a4", "k")}})


def test_lmo_runs_through_the_loop_and_spends_most_of_the_target(tiny_model, tiny_tokenizer):
    train_data, valid_data = _data(tiny_tokenizer)
    model = attach_lora(tiny_model, RDP_PARAMS.lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train(
        model, train_data, valid_data, RDP_PARAMS, "lmo", {"clip": 0.5}, show_progress=False
    )
    plan, ledger, law = result.plan, result.ledger, result.controller.lmo_params
    assert result.steps_taken == len(ledger) == plan.steps and not result.stopped_by_guard
    for e in ledger.entries:
        assert e.mechanism == "lmo" and e.clip_thresholds == (0.5,)
        assert e.lmo() == law and e.sample_rate == plan.sample_rate
    composed = accountant.ledger_epsilon(ledger, plan.delta)
    assert composed == pytest.approx(result.epsilon)
    assert composed == pytest.approx(
        lmo_accounting.epsilon(law, plan.sample_rate, plan.steps, plan.delta), rel=1e-12
    )
    assert 0.95 * RDP_PARAMS.epsilon <= composed <= RDP_PARAMS.epsilon
    assert any(
        not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad
    )
    assert math.isfinite(result.valid_loss)
