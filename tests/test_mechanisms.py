"""Per-group clipping and Gaussian noise checked against a direct computation."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule

from privtune.privacy.action import Action
from privtune.privacy.mechanisms import (
    Gaussian,
    NoNoise,
    effective_noise_multiplier,
    gradient_noise_multiplier,
    per_sample_factors,
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
    mech.accumulate(spec, torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, -1.0]]))
    stats = mech.release(spec, 4.0, batch_size=3)
    torch.testing.assert_close(p.grad, torch.tensor([11.0, 2.0, 2.0]) / 4.0)
    assert stats.norms is None and mech.ledger_entry(spec, 0, 0.1, 3) is None
    assert mech.release(spec, 4.0, batch_size=0) is None  # an empty batch releases nothing


# -- per-sample scaling rules, the counts and the step's noise, value by value ----------------


@settings(max_examples=60, deadline=None)
@given(
    norms=st.lists(st.floats(0.0, 1e4), min_size=1, max_size=20),
    clip=st.floats(1e-3, 10.0),
    stability=st.floats(1e-4, 1.0),
    scaling=st.sampled_from(["clip", "normalize", "psac"]),
)
def test_every_scaling_rule_bounds_a_sample_by_its_threshold(norms, clip, stability, scaling):
    """The sensitivity (hence the noise the ledger records) is C for every rule."""
    n = torch.tensor(norms, dtype=torch.float64)[:, None]
    c = torch.tensor([clip], dtype=torch.float64)
    scaled = per_sample_factors(n, c, scaling, stability) * n
    assert float(scaled.max()) <= clip * (1 + 1e-9)


def test_auto_s_and_psac_weights_are_the_papers():
    norms = torch.tensor([[0.0], [0.01], [0.1], [1.0], [10.0]], dtype=torch.float64)
    c = torch.tensor([2.0], dtype=torch.float64)
    auto_s = per_sample_factors(norms, c, "normalize", 0.01)[:, 0]
    torch.testing.assert_close(auto_s, 2.0 / (norms[:, 0] + 0.01))
    psac = per_sample_factors(norms, c, "psac", 0.1)[:, 0]
    torch.testing.assert_close(psac, 2.0 / (norms[:, 0] + 0.1 / (norms[:, 0] + 0.1)))
    # AUTO-S gives a vanishing gradient the weight C / gamma; PSAC keeps it at C and its weight
    # is non-monotonic in the norm (rises, then falls).
    assert float(auto_s[0]) == pytest.approx(200.0)
    assert float(psac[0]) == pytest.approx(2.0)
    assert psac[2] > psac[0] and psac[2] > psac[4]
    with pytest.raises(ValueError, match="stability"):
        per_sample_factors(norms, c, "psac", 0.0)


def test_clipping_leaves_a_gradient_within_its_threshold_alone_and_names_bad_rules():
    """Plain clipping is the default rule; a group norm at or under half its threshold keeps
    factor exactly 1 (clipping never amplifies), one above lands just under the threshold.
    AUTO-S and PSAC refuse a missing stability constant, and an unknown rule names the known
    ones."""
    norms = torch.tensor([[0.25, 3.0], [2.0, 0.1], [0.0, 1.0]], dtype=torch.float64)
    c = torch.tensor([1.0, 0.5], dtype=torch.float64)
    factors = per_sample_factors(norms, c)
    torch.testing.assert_close(factors, per_sample_factors(norms, c, "clip", 0.0))
    assert float(factors[0, 0]) == 1.0 and float(factors[1, 1]) == 1.0
    assert float(factors[2, 0]) == 1.0  # a zero gradient stays zero, with no division by 0
    for i, k in [(0, 1), (1, 0), (2, 1)]:  # above the threshold: scaled to just under it
        assert 1 - 1e-5 < float(factors[i, k] * norms[i, k] / c[k]) < 1.0
    for rule in ("normalize", "psac"):
        with pytest.raises(ValueError) as err:
            per_sample_factors(norms, c, rule)
        assert str(err.value) == f"scaling '{rule}' needs a stability constant > 0"
        assert per_sample_factors(norms, c, rule, 1e-9).shape == (3, 2)  # any positive one
    with pytest.raises(ValueError) as err:
        per_sample_factors(norms, c, "flat", 0.1)
    assert str(err.value) == "unknown per-sample scaling 'flat': use one of clip, normalize, psac"


def test_a_gaussian_steps_ledger_entry_carries_its_counts_noise():
    """What the accountant composes for a step that also releases counts: the admitted z, the
    rate, the clips and stds, and the counts' noise std and how many counts (2 groups x 3
    levels); the summary logs the calibrated z under its name."""
    from privtune.privacy.mechanisms.gaussian import Gaussian

    groups = [[torch.nn.Parameter(torch.zeros(2))], [torch.nn.Parameter(torch.zeros(3))]]
    mech = Gaussian(groups, ["a", "b"], seed=0)
    action = Action((1.0, 0.5), 0.8, count_noise=6.0, count_levels=(0.5, 1.0, 2.0))
    spec = mech.admit(action, 0.8)
    entry = mech.ledger_entry(spec, 7, 0.02, 16)
    assert (entry.step, entry.sample_rate, entry.batch_size) == (7, 0.02, 16)
    assert entry.noise_multiplier == 0.8 and entry.clip_thresholds == (1.0, 0.5)
    assert entry.count_noise_std == 6.0 and entry.count_dims == 6
    assert entry.noise_stds == spec.stds and len(entry.noise_stds) == 2
    assert mech.summary(0.8) == {"noise_multiplier": 0.8}
    with pytest.raises(ValueError) as err:
        mech.admit(Action((1.0,), 0.8), 0.8)
    assert str(err.value) == "the action has 1 clipping thresholds for 2 groups (a, b)"


def _two_groups_with_known_norms():
    """Groups a (2 weights) and b (3) holding 4 per-sample gradients whose group norms are
    exact in float32: a = 5, 0.5, 0, 0.5 and b = 0.125, 2, 0.25, 0.375."""
    from privtune.privacy.mechanisms.gaussian import Gaussian

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad_sample = torch.tensor([[5.0, 0.0], [0.5, 0.0], [0.0, 0.0], [0.0, 0.5]])
    b.grad_sample = torch.tensor(
        [[0.0, 0.0, 0.125], [2.0, 0.0, 0.0], [0.0, 0.25, 0.0], [0.0, 0.0, 0.375]]
    )
    mech = Gaussian([[a], [b]], ["a", "b"], seed=0)
    mech.generator.manual_seed(3)
    return mech, torch.Generator().manual_seed(3)


def test_a_step_releases_the_count_its_action_asks_for_and_reports_it():
    """With count noise and no levels, a step releases the unclipped fraction (clips 1 and 0.5:
    samples 2 and 3 are within both), drawn before the gradient noise from the mechanism's
    generator, and reports it with z, the clipped fraction (2 of 8 group norms) and the
    clips; with levels, the (group x level) histogram instead; with neither, no count."""
    mech, twin = _two_groups_with_known_norms()
    stats = release_step(mech, [1.0, 0.5], 0.8, 4.0, batch_size=4, count_noise=6.0)
    draw = float(torch.normal(0.0, 6.0, size=(1,), generator=twin))
    fraction = (2 - 4 / 2 + draw) / 4.0 + 0.5
    assert stats.unclipped_fraction_dp == pytest.approx(fraction, rel=1e-12)
    assert stats.norm_histogram_dp is None
    assert stats.metrics == pytest.approx(
        {
            "noise_multiplier": 0.8,
            "clipped_fraction": 0.25,
            "unclipped_fraction_dp": fraction,
            "clip/a": 1.0,
            "clip/b": 0.5,
        },
        rel=1e-12,
    )

    mech, twin = _two_groups_with_known_norms()
    levels = (0.5, 1.0)  # a: <= 0.5 and <= 1: 3 and 3; b (0.25, 0.5): 2 and 3
    stats = release_step(
        mech, [1.0, 0.5], 0.8, 4.0, batch_size=4, count_noise=6.0, count_levels=levels
    )
    draws = torch.normal(0.0, 6.0, size=(2, 2), generator=twin).double().numpy()
    expected = (np.array([[3.0, 3.0], [2.0, 3.0]]) - 4 / 2 + draws) / 4.0 + 0.5
    np.testing.assert_allclose(stats.norm_histogram_dp, expected, rtol=1e-12)
    assert stats.unclipped_fraction_dp is None and "unclipped_fraction_dp" not in stats.metrics

    mech, _ = _two_groups_with_known_norms()
    stats = release_step(mech, [1.0, 0.5], 0.8, 4.0, batch_size=4)
    assert stats.unclipped_fraction_dp is None and stats.norm_histogram_dp is None
    assert set(stats.metrics) == {"noise_multiplier", "clipped_fraction", "clip/a", "clip/b"}


def test_the_gradient_noise_is_added_to_the_clipped_sum_after_the_count():
    """p.grad after a step is (clipped sum + noise) / expected batch, the noise being the
    generator's draws right after the count's, one run per group, in the parameter's dtype."""
    from privtune.privacy.mechanisms.gaussian import Gaussian

    mech, twin = _two_groups_with_known_norms()
    (a,), (b,) = mech.groups
    rows = {id(a): a.grad_sample.clone(), id(b): b.grad_sample.clone()}
    spec = mech.admit(Action((1.0, 0.5), 0.8, count_noise=6.0), 0.8)
    mech.accumulate(spec)
    mech.release(spec, 4.0, 4)
    torch.normal(0.0, 6.0, size=(1,), generator=twin)  # the count's draw comes first
    norms = torch.stack([rows[id(a)].norm(dim=1), rows[id(b)].norm(dim=1)], dim=1)
    factors = per_sample_factors(norms, torch.tensor([1.0, 0.5]))
    for k, p in enumerate((a, b)):
        clipped = (factors[:, k : k + 1] * rows[id(p)]).sum(0)
        noise = torch.normal(0.0, spec.stds[k], size=(p.numel(),), generator=twin)
        torch.testing.assert_close(p.grad, (clipped + noise) / 4.0, rtol=1e-6, atol=1e-7)

    for dtype in (torch.float64, torch.bfloat16):  # noise drawn in float32, cast to p's
        weight = torch.nn.Parameter(torch.zeros(2, dtype=dtype))
        weight.grad_sample = torch.ones(3, 2, dtype=dtype)
        mech = Gaussian([[weight]], ["w"], seed=0)
        release_step(mech, [1.0], 0.8, 3.0, batch_size=3)
        assert weight.grad.dtype == dtype


def test_a_count_std_at_the_edge_of_the_room_for_the_gradient_is_raised():
    """The counts leave the gradient noise only if 2 sigma_b > z sqrt(D); at that edge (up to
    the 1e-6 slack) sigma_b is raised to z sqrt(D), so the gradient's share stays z / sqrt(3/4)
    instead of blowing up by a factor of about 700."""
    from privtune.privacy.mechanisms.gaussian import admit_gaussian

    z, dims = 0.8, 4  # 2 groups x 2 levels
    edge = z * math.sqrt(dims) * (1 + 1e-6) / 2
    action = Action((1.0, 0.5), z, count_noise=edge, count_levels=(0.5, 1.0))
    admitted, stds, count_std = admit_gaussian(action, z, 2)
    assert count_std == z * math.sqrt(dims) and admitted.count_noise == count_std
    grad_z = z / math.sqrt(3 / 4)
    assert effective_noise_multiplier((1.0, 0.5), stds) == pytest.approx(grad_z, rel=1e-6)


def test_the_mechanisms_factors_follow_the_actions_rule_at_the_norms_precision():
    """Gaussian.factors applies the action's rule and stability (PSAC here), and compares in
    the norms' dtype: a float64 norm of 10 clipped to 0.1 (not float32's 0.1000000015) lands
    at or under 0.1."""
    mech, _ = _two_groups_with_known_norms()
    norms = torch.tensor([[10.0, 0.3], [0.05, 0.01]], dtype=torch.float64)
    spec = mech.admit(Action((0.1, 0.2), 1.0, scaling="psac", stability=0.1), 1.0)
    c = torch.tensor([0.1, 0.2], dtype=torch.float64)
    torch.testing.assert_close(
        mech.factors(norms, spec), per_sample_factors(norms, c, "psac", 0.1), rtol=0, atol=0
    )
    spec = mech.admit(Action((0.1, 0.2), 1.0), 1.0)
    assert float(mech.factors(norms, spec)[0, 0] * norms[0, 0]) <= 0.1


def test_count_releases_draw_their_noise_from_the_mechanisms_own_generator():
    """The counts' noise is the next draws of the mechanism's seeded generator, ADDED to the
    centred counts (a run's releases reproduce from its seed, on CPU and CUDA alike), and
    torch's global generator is left alone. Norms in float64 a hair above a clip that float32
    cannot hold (0.1) count as above it: thresholds are compared in the norms' own dtype."""
    clip = 0.1
    norms = torch.tensor(
        [[0.05, 0.3], [clip * (1 + 1e-12), 0.01], [0.2, 0.2], [clip, 0.02]], dtype=torch.float64
    )
    clips, levels, std, expected = [clip, 0.25], [1.0, 2.0], 2.0, 4.0
    mech = Gaussian([[torch.nn.Parameter(torch.zeros(1))]] * 2, ["a", "b"], seed=0)
    mech.generator.manual_seed(7)
    twin = torch.Generator().manual_seed(7)
    global_state = torch.get_rng_state()

    count = mech.release_unclipped_count(norms, clips, std, expected)
    draw = float(torch.normal(0.0, std, size=(1,), generator=twin))
    within = sum(
        all(float(norms[i, k]) <= clips[k] for k in range(2)) for i in range(4)
    )  # sample 3 only: 1 (sample 1 is a hair above 0.1, sample 0's second group above 0.25)
    assert within == 1
    assert count == pytest.approx((within - 4 / 2 + draw) / expected + 0.5, rel=1e-12)

    histogram = mech.release_norm_histogram(norms, clips, levels, std, expected)
    draws = torch.normal(0.0, std, size=(2, 2), generator=twin).double().numpy()
    # group a (clip 0.1): <= 0.1: samples 0, 3; <= 0.2: samples 0, 1, 3, 2 (0.2 <= 0.2)
    # group b (clip 0.25): <= 0.25: samples 1, 2, 3; <= 0.5: all four
    counts = np.array([[2.0, 4.0], [3.0, 4.0]])
    np.testing.assert_allclose(histogram, (counts - 4 / 2 + draws) / expected + 0.5, rtol=1e-12)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_count_noise_too_small_names_the_least_std_that_would_do():
    """z = 2 over D = 4 counts needs sigma_b > z * sqrt(D) / 2 = 2 (Andrew et al., Thm 1 with
    the centred count's sensitivity 1/2); the error says so, with the number."""
    with pytest.raises(ValueError) as err:
        gradient_noise_multiplier(2.0, 1.0, count_dims=4)
    assert str(err.value) == (
        "count noise std 1 is too small for total noise multiplier 2: "
        "it must exceed z * sqrt(4) / 2 = 2"
    )


def test_per_group_stds_are_scaled_together_until_the_step_with_its_counts_is_z():
    """Stds the controller asked for per group (0.5 on both, clips 1 and 0.5: z 0.447 alone)
    keep their ratio and are raised by one factor until the gradient and 2 x 2 counts of std 3
    are one mechanism of z = 0.8 (Andrew et al., Thm 1: z_grad^-2 = z^-2 - D / (2 sigma_b)^2);
    stds already above what z needs are kept; a group asked to take no noise is refused."""
    from privtune.privacy.mechanisms.gaussian import admit_gaussian

    clips, z, count_std, dims = (1.0, 0.5), 0.8, 3.0, 4
    action = Action(clips, z, noise_stds=(0.5, 0.5), count_noise=count_std, count_levels=(1, 2))
    admitted, stds, released_count_std = admit_gaussian(action, z, 2)
    grad_z = (z**-2 - dims * (0.5 / count_std) ** 2) ** -0.5  # 0.830...
    factor = grad_z / (1 / math.sqrt((1 / 0.5) ** 2 + (0.5 / 0.5) ** 2))
    assert stds == pytest.approx((0.5 * factor, 0.5 * factor), rel=1e-12)
    assert released_count_std == count_std == admitted.count_noise
    assert admitted.noise_stds == stds
    assert admitted.noise_multiplier == pytest.approx(z, rel=1e-12)
    quiet_counts = Action(clips, z, noise_stds=(0.5, 0.5), count_noise=0.1, count_levels=(1, 2))
    admitted, _, raised_count_std = admit_gaussian(quiet_counts, z, 2)
    assert raised_count_std == z * math.sqrt(dims) == admitted.count_noise  # raised, recorded
    loud = Action(clips, z, noise_stds=(50.0, 50.0))
    admitted, stds, _ = admit_gaussian(loud, z, 2)
    assert stds == (50.0, 50.0) and admitted.noise_multiplier == pytest.approx(1 / math.sqrt(5e-4))
    with pytest.raises(ValueError) as err:
        admit_gaussian(Action(clips, z, noise_stds=(0.0, 0.5)), z, 2)
    assert str(err.value) == "every per-group noise std must be > 0, got (0.0, 0.5)"


def test_effective_noise_multiplier_edges():
    """A group or a count without noise leaves no guarantee (z = 0); clips and stds must pair
    up, one each, and there must be at least one."""
    assert effective_noise_multiplier((1.0, 0.5), (0.0, 1.0)) == 0.0
    assert effective_noise_multiplier((1.0,), (1.0,), count_std=0.0) == 0.0
    assert effective_noise_multiplier((1.0,), (2.0,), count_std=None) == 2.0
    for clips, stds in [((1.0, 0.5), (1.0,)), ((), ())]:
        with pytest.raises(ValueError) as err:
            effective_noise_multiplier(clips, stds)
        assert str(err.value) == "need one noise std per clipping threshold"


def test_factors_and_noise_are_made_on_the_device_of_the_norms_and_parameters():
    """On CUDA the norms and parameters live on the GPU while the noise is drawn on the CPU
    generator: the thresholds must be made beside the norms, and each group's draw moved to
    its parameters' device. PyTorch's meta device stands in for CUDA here (a CPU tensor
    meeting a meta one fails as it would meeting a CUDA one), so this runs on any machine."""
    a = torch.nn.Parameter(torch.zeros(2, device="meta"))
    b = torch.nn.Parameter(torch.zeros(3, device="meta", dtype=torch.bfloat16))
    mech = Gaussian([[a], [b]], ["a", "b"], seed=0)
    spec = mech.admit(Action((1.0, 0.5), 1.0), 1.0)
    norms = torch.ones(4, 2, device="meta", dtype=torch.float64)
    factors = mech.factors(norms, spec)
    assert (factors.device.type, factors.shape, factors.dtype) == ("meta", (4, 2), torch.float64)
    total = torch.zeros(5, device="meta")  # the summed gradient, both groups side by side
    mech.add_noise(total, spec.stds)
    mech.scale(total, 2.0)
    assert (a.grad.device.type, a.grad.shape, a.grad.dtype) == ("meta", (2,), torch.float32)
    assert (b.grad.device.type, b.grad.shape, b.grad.dtype) == ("meta", (3,), torch.bfloat16)


def test_canary_rows_must_span_every_parameter():
    """Extra rows (the audit's gradient canaries) of another width would land on other
    coordinates: clipped and noised as a sample, but auditing the wrong thing."""
    a = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(4))
    a.grad_sample, b.grad_sample = torch.ones(2, 2, 3), torch.ones(2, 4)
    mech = Gaussian([[a], [b]], ["a", "b"], seed=0)
    spec = mech.admit(Action((1.0, 1.0), 0.8), 0.8)
    for rows in (torch.ones(1, 9), torch.ones(1, 11), torch.ones(10)):
        with pytest.raises(ValueError, match="one \\(rows, T\\) tensor .* T = 10"):
            mech.accumulate(spec, rows)
    assert a.grad_sample is not None  # a refused call folded nothing in
    canary = torch.zeros(1, 10)
    canary[0, 7] = 2.0  # b's second entry
    mech.accumulate(spec, canary)  # a third sample
    stats = mech.release(spec, 3.0, 3)
    assert a.grad_sample is None and stats.norms.shape == (3, 2)
    assert stats.norms[2].tolist() == [0.0, 2.0]  # the canary counted in b's group only
