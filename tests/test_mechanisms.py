"""Per-group clipping and Gaussian noise checked against a direct computation."""

import math

import pytest
import torch
from opacus import GradSampleModule

from privtune.privacy.action import Action
from privtune.privacy.mechanisms import (
    Gaussian,
    NoNoise,
    effective_noise_multiplier,
    uniform_noise_stds,
)
from tests.conftest import release_step


def test_effective_noise_multiplier_formula():
    """Values worked out by hand (not the code's formula restated): z^-2 = sum (C_k / s_k)^2,
    plus D (1/2 / sigma_b)^2 for D released counts of sensitivity 1/2."""
    assert effective_noise_multiplier([1.0], [2.0]) == pytest.approx(2.0)
    # 1/9 + 4 + 1/16 = 4.173611...
    assert effective_noise_multiplier([1.0, 2.0, 0.5], [3.0, 1.0, 2.0]) == pytest.approx(
        0.48949020986880254, rel=1e-12
    )
    assert effective_noise_multiplier([1.0, 1.0], uniform_noise_stds([1.0, 1.0], 1.7)) == (
        pytest.approx(1.7)
    )
    # a count of std 1: (1/2)^2 = 1/4 beside the gradient's 1/4: z = sqrt(2)
    assert effective_noise_multiplier([1.0], [2.0], 1.0) == pytest.approx(math.sqrt(2), rel=1e-12)
    # three counts of std 2: 3/16 beside 1/4: z = 1 / sqrt(7/16)
    assert effective_noise_multiplier([1.0], [2.0], 2.0, 3) == pytest.approx(
        1.5118578920369088, rel=1e-12
    )


def test_released_count_moves_by_its_accounted_sensitivity():
    """The count the step releases moves by exactly 1/2 when one record is added (clipped or
    not); the accountant charges that sensitivity: a step releasing the count at std sigma_b
    has z^-2 = (C/s)^2 + (0.5/sigma_b)^2, not less."""
    p = torch.nn.Parameter(torch.zeros(1))
    mech = Gaussian([[p]], ["p"], seed=0)
    clips = [1.0]
    norms = torch.tensor([[0.5], [3.0], [0.2]])
    base = mech.release_unclipped_count(norms, clips, 1e-12, 1.0)
    for added in (0.1, 7.0):  # an unclipped and a clipped record
        more = torch.cat([norms, torch.tensor([[added]])])
        moved = mech.release_unclipped_count(more, clips, 1e-12, 1.0)
        assert abs(moved - base) == pytest.approx(0.5, abs=1e-9)
    counts = mech.release_norm_histogram(norms, clips, [0.5, 1.0], 1e-12, 1.0)
    more = mech.release_norm_histogram(torch.cat([norms, norms[:1]]), clips, [0.5, 1.0], 1e-12, 1.0)
    assert abs(more - counts).ravel().tolist() == pytest.approx([0.5, 0.5], abs=1e-9)
    sigma_b = 0.8
    z = effective_noise_multiplier(clips, [1.5], sigma_b)
    assert z**-2 == pytest.approx((1 / 1.5) ** 2 + (0.5 / sigma_b) ** 2, rel=1e-12)


def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    return model, x, y


def _per_sample_grads(model, x, y):
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        ((model(x[i : i + 1]) - y[i : i + 1]) ** 2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


def test_per_group_clipping_matches_direct_computation():
    model, x, y = _tiny()
    direct = _per_sample_grads(model, x, y)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    gsm.zero_grad()
    ((gsm(x) - y) ** 2).sum().backward()
    params = list(model.parameters())
    groups = [params[:2], params[2:]]
    clips = [0.3, 0.05]
    mech = Gaussian(groups, ["first", "second"], seed=0)
    stats = release_step(mech, clips, 1e-12, 1.0, batch_size=len(x))  # noise ~1e-13

    expected = [torch.zeros_like(p) for p in params]
    for n, sample in enumerate(direct):
        for k, idx in enumerate([(0, 1), (2, 3)]):
            norm = math.sqrt(sum(float(sample[i].pow(2).sum()) for i in idx))
            factor = min(1.0, clips[k] / (norm + 1e-6))
            for i in idx:
                expected[i] += factor * sample[i]
            assert float(stats.norms[n, k]) == pytest.approx(norm, rel=1e-4)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
    # every clipped per-sample group contribution respects its threshold: released alone,
    # each sample's group gradient has norm min(its norm, the threshold)
    for n in range(len(x)):
        gsm.zero_grad()
        ((gsm(x[n : n + 1]) - y[n : n + 1]) ** 2).sum().backward()
        release_step(mech, clips, 1e-12, 1.0, batch_size=1)
        for k, idx in enumerate([(0, 1), (2, 3)]):
            released = math.sqrt(sum(float(params[i].grad.pow(2).sum()) for i in idx))
            assert released <= clips[k] * (1 + 1e-5)
            assert released == pytest.approx(min(float(stats.norms[n, k]), clips[k]), rel=1e-4)


def test_noise_has_the_requested_std_per_group():
    big = torch.nn.Parameter(torch.zeros(200_000))
    small = torch.nn.Parameter(torch.zeros(200_000))
    mech = Gaussian([[big], [small]], ["big", "small"], seed=1)
    big.grad_sample = torch.zeros(1, 200_000)
    small.grad_sample = torch.zeros(1, 200_000)
    z = effective_noise_multiplier([1.0, 1.0], [2.0, 0.5])
    release_step(mech, [1.0, 1.0], z, 4.0, noise_stds=(2.0, 0.5))
    assert float(big.grad.std()) == pytest.approx(2.0 / 4.0, rel=0.01)
    assert float(small.grad.std()) == pytest.approx(0.5 / 4.0, rel=0.01)
    assert float(big.grad.mean()) == pytest.approx(0.0, abs=0.01)


def test_empty_batch_is_pure_noise():
    p = torch.nn.Parameter(torch.ones(10_000))
    mech = Gaussian([[p]], ["p"], seed=2)
    stats = release_step(mech, [1.0], 1.0, 1.0, batch_size=0)
    assert float(p.grad.std()) == pytest.approx(1.0, rel=0.05)
    assert stats.norms.shape == (0, 1) and stats.clipped_fraction == 0.0


def _records_and_grads(n=6, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    x, y = torch.randn(n, 4) * 3, torch.randn(n, 2)
    return GradSampleModule(model, batch_first=True, loss_reduction="sum"), x, y


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_micro_batches_release_the_same_step_as_the_whole_batch(micro):
    """Memory-bounded steps: clipped per-sample gradients summed over micro-batches, the noise
    added once: the same released gradient, norms and noise draw as the whole batch at once."""
    released = []
    for size in (6, micro):
        gsm, x, y = _records_and_grads()
        params = list(gsm.parameters())
        mech = Gaussian([params[:2], params[2:]], ["first", "second"], seed=5)
        spec = mech.admit(Action((0.4, 0.1), 0.7), 0.7)
        for start in range(0, 6, size):
            ((gsm(x[start : start + size]) - y[start : start + size]) ** 2).sum().backward()
            mech.accumulate(spec)
        stats = mech.release(spec, 3.0, 6)
        released.append(([p.grad.clone() for p in params], stats))
    (whole, whole_stats), (parts, part_stats) = released
    for a, b in zip(whole, parts, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole_stats.norms, part_stats.norms)
    assert whole_stats.clipped_fraction == part_stats.clipped_fraction
    assert whole_stats.metrics == part_stats.metrics  # z and thresholds


def test_a_parameter_without_per_sample_gradients_is_a_loud_error():
    """The silent failure of LoRA under opacus (no grad_sample: the adapter never learns) must
    stop the step, not release noise alone."""
    p = torch.nn.Parameter(torch.zeros(3))
    mech = Gaussian([[p]], ["p"], seed=0)
    with pytest.raises(RuntimeError, match="no per-sample gradient"):
        release_step(mech, [1.0], 1.0, 1.0, batch_size=1)


def test_no_noise_sums_the_extra_rows_and_scales_without_a_ledger_entry():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])  # what autograd summed for the records
    mech = NoNoise([[p]], ["p"], seed=0)
    spec = mech.admit(Action((), 0.0), 0.0)
    mech.accumulate(spec, [torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, -1.0]])])
    stats = mech.release(spec, 4.0, batch_size=3)
    torch.testing.assert_close(p.grad, torch.tensor([11.0, 2.0, 2.0]) / 4.0)
    assert stats.norms is None and mech.ledger_entry(spec, 0, 0.1, 3) is None
    assert mech.release(spec, 4.0, batch_size=0) is None  # an empty batch releases nothing
