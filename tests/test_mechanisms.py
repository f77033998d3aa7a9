"""Per-group clipping and Gaussian noise checked against a direct computation."""

import math

import pytest
import torch
from opacus import GradSampleModule

from privtune.privacy.mechanisms import (
    GaussianMechanism,
    effective_noise_multiplier,
    uniform_noise_stds,
)


def test_effective_noise_multiplier_formula():
    assert effective_noise_multiplier([1.0], [2.0]) == pytest.approx(2.0)
    clips, stds = [1.0, 2.0, 0.5], [3.0, 1.0, 2.0]
    expected = 1 / math.sqrt(sum((c / s) ** 2 for c, s in zip(clips, stds, strict=True)))
    assert effective_noise_multiplier(clips, stds) == pytest.approx(expected)
    assert effective_noise_multiplier(clips, uniform_noise_stds(clips, 1.7)) == pytest.approx(1.7)


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
    mech = GaussianMechanism(groups, torch.Generator().manual_seed(0))
    stats = mech.clip_and_accumulate(clips)

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
    # every clipped per-sample group contribution respects its threshold
    assert 0.0 < stats.clipped_fraction <= 1.0


def test_noise_has_the_requested_std_per_group():
    big = torch.nn.Parameter(torch.zeros(200_000))
    small = torch.nn.Parameter(torch.zeros(200_000))
    mech = GaussianMechanism([[big], [small]], torch.Generator().manual_seed(1))
    big.grad_sample = torch.zeros(1, 200_000)
    small.grad_sample = torch.zeros(1, 200_000)
    mech.step([1.0, 1.0], [2.0, 0.5], expected_batch_size=4.0)
    assert float(big.grad.std()) == pytest.approx(2.0 / 4.0, rel=0.01)
    assert float(small.grad.std()) == pytest.approx(0.5 / 4.0, rel=0.01)
    assert float(big.grad.mean()) == pytest.approx(0.0, abs=0.01)


def test_empty_batch_is_pure_noise():
    p = torch.nn.Parameter(torch.ones(10_000))
    mech = GaussianMechanism([[p]], torch.Generator().manual_seed(2))
    mech.step([1.0], [1.0], expected_batch_size=1.0, empty=True)
    assert float(p.grad.std()) == pytest.approx(1.0, rel=0.05)
