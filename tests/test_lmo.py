"""LMO-DP: sampler vs MGF, the MGF domain, the vector and subsampling bounds, the search."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy import integrate, stats

from privtune.errors import ConfigError
from privtune.privacy import lmo_search
from privtune.privacy.lmo import (
    PAPER_GRID,
    LMOGrid,
    LMOParams,
    epsilon,
    lmo_noise,
    mean_abs_noise,
    mean_inverse_scale,
    mgf,
    noise_std,
    paper_epsilon,
    rdp_at_shift,
    rdp_per_step,
    sample_inverse_scales,
    search,
    subsampled_rdp,
    usefulness,
    valid_orders,
)
from privtune.privacy.lmo_accounting import orders_up_to, rdp_to_epsilon_arrays
from privtune.privacy.lmo_mechanism import log_density_arrays

# The paper's "epsilon 0.3" file (task1/lmo_eps0.3.json), lam read as a rate.
PAPER_03 = LMOParams(a1=0.1, a3=0.1, a4=0.1, k=1.0, theta=0.5, lam=5.0, a=1.0, b=2.0)
# Heavier Gamma, fractional k, lam != 1 (a scale/rate swap changes its mean 25-fold).
OTHER = LMOParams(a1=0.3, a3=0.2, a4=0.5, k=0.5, theta=2.0, lam=5.0, a=0.0, b=1.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("change", "field"),
    [({"theta": 0.0}, "lmo.theta"), ({"lam": -1.0}, "lmo.lam"), ({"a": 2.0}, "lmo.b")],
)
def test_params_reject_bad_values_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        LMOParams(**{**PAPER_03.to_dict(), **change})
    assert info.value.field == field


def test_params_round_trip_through_dict() -> None:
    assert LMOParams.from_dict(OTHER.to_dict()) == OTHER


# ------------------------------------------------------------------ sampler against the MGF


@pytest.mark.parametrize("params", [PAPER_03, OTHER])
def test_sampler_moments_match_the_mgf(params: LMOParams) -> None:
    eps = sample_inverse_scales(params, 400_000, gen(1)).numpy()
    assert eps.min() >= params.a4 * params.a
    assert eps.mean() == pytest.approx(mean_inverse_scale(params), rel=0.01)
    for t in (-3.0, -0.9, 0.5):
        draws = np.exp(t * eps)
        se = draws.std() / math.sqrt(draws.size)
        assert abs(draws.mean() - float(mgf(params, t))) < 5 * se + 1e-12


def test_mgf_slope_at_zero_is_the_mean() -> None:
    h = 1e-6
    slope = (float(mgf(OTHER, h)) - float(mgf(OTHER, -h))) / (2 * h)
    assert slope == pytest.approx(mean_inverse_scale(OTHER), rel=1e-6)


def test_noise_law_matches_its_cdf_and_is_reproducible() -> None:
    clip = 2.5
    noise = lmo_noise(PAPER_03, (300, 200), clip, gen(2), dtype=torch.float64)
    assert noise.shape == (300, 200) and noise.dtype == torch.float64
    assert torch.equal(noise, lmo_noise(PAPER_03, (300, 200), clip, gen(2), dtype=torch.float64))
    # P(|n| <= x) = 1 - M(-x / clip): a sampler on another convention fails this KS test.
    magnitudes = noise.abs().flatten().numpy()
    test = stats.kstest(magnitudes, lambda x: 1.0 - mgf(PAPER_03, -np.asarray(x) / clip))
    assert test.pvalue > 1e-3
    assert abs(float(noise.mean())) < 5 * float(noise.std()) / math.sqrt(noise.numel())


def test_noise_rejects_a_bad_clip() -> None:
    with pytest.raises(ValueError, match="clip"):
        lmo_noise(PAPER_03, (3,), 0.0, gen())


def test_usefulness_is_the_probability_of_small_noise() -> None:
    noise = lmo_noise(OTHER, (200_000,), 1.0, gen(3), dtype=torch.float64)
    assert usefulness(OTHER, 0.9) == pytest.approx(
        float((noise.abs() <= 0.9).double().mean()), abs=0.01
    )
    # The paper's own printout for its 0.3 file.
    assert usefulness(PAPER_03, 0.9) == pytest.approx(0.18, abs=0.005)


def test_noise_std_and_mean_abs_match_direct_quadrature_and_samples() -> None:
    second, _ = integrate.quad(lambda t: t * float(mgf(PAPER_03, -t)), 0, np.inf, limit=200)
    first, _ = integrate.quad(lambda t: float(mgf(PAPER_03, -t)), 0, np.inf, limit=200)
    assert noise_std(PAPER_03, clip=2.0) == pytest.approx(2.0 * math.sqrt(2 * second), rel=1e-4)
    assert mean_abs_noise(PAPER_03) == pytest.approx(first, rel=1e-4)
    sample = lmo_noise(PAPER_03, (400_000,), 1.0, gen(4), dtype=torch.float64)
    assert float(sample.abs().mean()) == pytest.approx(first, rel=0.02)


def test_density_integrates_to_one() -> None:
    p = OTHER.arrays()
    total, _ = integrate.quad(
        lambda u: float(np.exp(log_density_arrays(p, u))), 0, np.inf, limit=400
    )
    assert 2 * total == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- MGF domain (unsoundness 2)


def test_mgf_is_infinite_past_its_pole_not_a_spurious_number() -> None:
    # a1 theta t = 0.05 t: the Gamma factor has its pole at t = 20.
    assert np.isfinite(mgf(PAPER_03, 19.5))
    assert np.isinf(mgf(PAPER_03, 20.0)) and np.isinf(mgf(PAPER_03, 127.0))
    with pytest.raises(ValueError, match="NaN"):
        mgf(PAPER_03, math.nan)


def test_valid_orders_of_the_paper_03_file_stop_at_20() -> None:
    assert valid_orders(PAPER_03).tolist() == list(range(2, 21))
    rdp = rdp_per_step(PAPER_03, orders_up_to(128))
    assert np.isfinite(rdp[:19]).all() and np.isinf(rdp[19:]).all()


def test_paper_03_per_step_epsilon_is_about_1_31_not_0_3() -> None:
    sound = epsilon(PAPER_03, sample_rate=1.0, steps=1, delta=1e-10)
    assert sound == pytest.approx(1.31, abs=0.01)
    reported = paper_epsilon(PAPER_03, 2048 / 67350, 192, 1e-10, round_epsilon=0.3)
    # What the authors' code prints: 0.293 at order 128 (past the pole) and the SST-2 proxy.
    assert reported.per_step == pytest.approx(0.293, abs=0.001)
    assert reported.per_step_order == 128
    assert reported.composed_no_subsampling == pytest.approx(23.9, abs=0.05)
    assert reported.gaussian_proxy == pytest.approx(0.157, abs=0.001)
    assert reported.proxy_sigma == pytest.approx(22.73, abs=0.01)


# ----------------------------------------------------------------- vector case (unsoundness 3)


@settings(max_examples=60, deadline=None)
@given(
    x=st.floats(0.0, 1.0),
    y=st.floats(0.0, 1.0),
    alpha=st.integers(2, 20),
)
def test_per_coordinate_bound_is_superadditive_in_the_shift(x: float, y: float, alpha: int) -> None:
    fx, fy, fxy = (float(rdp_at_shift(PAPER_03, [alpha], s)[0]) for s in (x, y, x + y))
    assert fx >= -1e-12 and fxy >= fx - 1e-12  # non-negative and non-decreasing
    assert fx + fy <= fxy + 1e-9 * (1 + fxy)


def _exact_renyi(params: LMOParams, shift: float, alpha: float) -> float:
    """D_alpha(noise + shift || noise) of the 1-D mixture, by quadrature on its exact density."""
    p = params.arrays()

    def integrand(u: float) -> float:
        return float(
            np.exp(
                alpha * log_density_arrays(p, u - shift) + (1 - alpha) * log_density_arrays(p, u)
            )
        )

    cuts = [-np.inf, -1.0, 0.0, shift, shift + 1.0, np.inf]
    total = sum(
        integrate.quad(integrand, lo, hi, limit=400)[0]
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)
    )
    return math.log(total) / (alpha - 1)


@pytest.mark.parametrize("alpha", [2, 5, 12])
def test_exact_divergence_of_l1_bounded_vector_shifts_is_within_the_bound(alpha: int) -> None:
    bound = float(rdp_per_step(PAPER_03, [alpha])[0])
    one_d = _exact_renyi(PAPER_03, 1.0, alpha)
    assert 0 < one_d <= bound
    # The same L1 budget spread over 4 coordinates composes to less (superadditivity).
    spread = sum(_exact_renyi(PAPER_03, s, alpha) for s in (0.4, 0.3, 0.2, 0.1))
    assert 0 < spread <= one_d <= bound


def test_l2_clipping_would_not_be_covered() -> None:
    """A unit L2 shift spread over d coordinates has L1 norm sqrt(d): past f(alpha, 1)."""
    d, alpha = 64, 4
    spread = d * float(rdp_at_shift(PAPER_03, [alpha], 1 / math.sqrt(d))[0])
    assert spread > float(rdp_per_step(PAPER_03, [alpha])[0])


# ------------------------------------------------------------------------------ subsampling


@pytest.mark.parametrize(("z", "q"), [(1.0, 0.01), (2.0, 32 / 1920), (0.8, 0.1)])
def test_subsampled_bound_covers_and_tracks_opacus_gaussian(z: float, q: float) -> None:
    orders = orders_up_to(64)
    ours = subsampled_rdp(orders / (2 * z * z), q)
    tight = compute_rdp(q=q, noise_multiplier=z, steps=1, orders=orders)
    assert np.all(ours >= tight * (1 - 1e-9))
    eps_ours = rdp_to_epsilon_arrays(ours * 500, orders, 1e-5)
    eps_tight, _ = get_privacy_spent(orders=orders, rdp=tight * 500, delta=1e-5)
    assert eps_tight * (1 - 1e-9) <= eps_ours <= 1.4 * eps_tight


@settings(max_examples=40, deadline=None)
@given(
    q=st.floats(1e-4, 0.99),
    increments=st.lists(st.floats(0.0, 3.0), min_size=30, max_size=30),
)
def test_subsampling_never_increases_rdp(q: float, increments: list[float]) -> None:
    base = np.cumsum(increments) / np.arange(1, 31)  # non-negative curve
    sub = subsampled_rdp(base, q)
    assert np.all(sub <= base + 1e-12) and np.all(sub >= -1e-12)
    assert np.array_equal(subsampled_rdp(base, 1.0), base)


def test_exact_subsampled_divergences_are_within_the_bound() -> None:
    """Both directions of the 1-D subsampled pair, (1-q) P0 + q P1 vs P0, by quadrature."""
    q, alpha = 0.2, 4
    p = PAPER_03.arrays()
    bound = float(subsampled_rdp(rdp_per_step(PAPER_03, orders_up_to(alpha)), q)[-1])

    def log_mix(u: float) -> float:
        return float(
            np.logaddexp(
                math.log1p(-q) + log_density_arrays(p, u),
                math.log(q) + log_density_arrays(p, u - 1),
            )
        )

    def log_plain(u: float) -> float:
        return float(log_density_arrays(p, u))

    def renyi(log_num, log_den) -> float:
        def f(u: float) -> float:
            return math.exp(alpha * log_num(u) + (1 - alpha) * log_den(u))

        cuts = [-np.inf, -1.0, 0.0, 1.0, 2.0, np.inf]
        pieces = zip(cuts[:-1], cuts[1:], strict=True)
        return math.log(sum(integrate.quad(f, a, b, limit=400)[0] for a, b in pieces)) / (alpha - 1)

    assert 0 < renyi(log_mix, log_plain) <= bound
    assert 0 < renyi(log_plain, log_mix) <= bound


def test_epsilon_grows_with_steps_and_sample_rate() -> None:
    base = epsilon(PAPER_03, 32 / 1920, 180, 1 / 19200)
    assert epsilon(PAPER_03, 32 / 1920, 360, 1 / 19200) > base
    assert epsilon(PAPER_03, 64 / 1920, 180, 1 / 19200) > base
    assert base < epsilon(PAPER_03, 1.0, 180, 1 / 19200)
    with pytest.raises(ValueError, match="delta"):
        epsilon(PAPER_03, 0.1, 10, 0.0)


# ------------------------------------------------------ Monte Carlo privacy loss of the sampler


@pytest.mark.parametrize("shifts", [(1.0,), (0.5, 0.25, 0.25), (0.4, 0.3, 0.2, 0.1)])
def test_monte_carlo_privacy_loss_of_the_sampler_stays_within_the_bound(shifts: tuple) -> None:
    """Neighbouring L1-clipped sums differ by `shifts` (||.||_1 = 1 clip): sample the released
    vector with lmo_noise, evaluate the exact privacy loss, and compare with the bound."""
    n, clip = 200_000, 1.0
    shift = torch.tensor(shifts, dtype=torch.float64)
    y = shift + lmo_noise(PAPER_03, (n, len(shifts)), clip, gen(5), dtype=torch.float64)
    p = PAPER_03.arrays()
    y_np, s_np = y.numpy(), shift.numpy()
    loss = (log_density_arrays(p, y_np - s_np) - log_density_arrays(p, y_np)).sum(axis=1)
    assert loss.mean() > 0  # a KL estimate: the shift is detectable
    for alpha in (2, 3):
        # D_alpha(P || Q) = 1/(alpha-1) log E_P[exp((alpha-1) L)]
        empirical = math.log(np.mean(np.exp((alpha - 1) * loss))) / (alpha - 1)
        assert 0 < empirical <= float(rdp_per_step(PAPER_03, [alpha])[0])
    # delta(eps) = E_P[(1 - e^{eps - L})_+] at the sound epsilon for delta = 1e-2.
    target_delta = 1e-2
    eps = epsilon(PAPER_03, 1.0, 1, target_delta)
    empirical_delta = np.mean(np.clip(1 - np.exp(eps - loss), 0, None))
    assert empirical_delta <= target_delta
    # ...and that epsilon is not vacuous: at a quarter of it the delta is exceeded.
    assert np.mean(np.clip(1 - np.exp(eps / 4 - loss), 0, None)) > target_delta


# ------------------------------------------------------------------------------------ search

TINY_GRID = LMOGrid(
    version="test-tiny",
    a1=(0.01, 0.1),
    a3=(0.05, 0.3),
    a4=(0.1, 0.4, 0.9),
    theta_k=((0.5, 1.0), (2.0, 2.0)),
    lam=(1.0, 5.0),
    uniform_ba=((1.0, 0.0), (3.0, 2.0)),
)
PLAN = {"sample_rate": 32 / 1920, "steps": 180, "delta": 1 / 19200}


def test_paper_grid_has_the_papers_40824_candidates() -> None:
    p = PAPER_GRID.arrays()
    assert len(PAPER_GRID) == 40_824 == p["a1"].size
    assert set(np.round(p["a1"], 6)) == {round(0.1 * i, 6) for i in range(1, 10)}
    assert set(zip(p["b"], p["a"], strict=True)) == {(1.0, 0.0), (2.0, 1.0)}


def test_vectorised_grid_epsilons_match_the_scalar_accountant() -> None:
    p = PAPER_GRID.arrays()
    pick = np.random.default_rng(0).choice(len(PAPER_GRID), 12, replace=False)
    sub = {k: v[pick] for k, v in p.items()}
    vec = lmo_search.grid_epsilons(sub, max_order=128, **PLAN)
    for i, j in enumerate(pick):
        params = LMOParams(**{k: float(p[k][j]) for k in lmo_search.FIELDS})
        assert vec[i] == pytest.approx(epsilon(params, **PLAN), rel=1e-9)


@pytest.mark.parametrize("objective", ["usefulness", "std"])
def test_search_returns_the_best_feasible_candidate(objective: str, tmp_path) -> None:
    target = 2.0
    result = search(
        target, **PLAN, objective=objective, grid=TINY_GRID, cache_path=tmp_path / "c.json"
    )
    p = TINY_GRID.arrays()
    candidates = [
        LMOParams(**{k: float(p[k][i]) for k in lmo_search.FIELDS}) for i in range(len(TINY_GRID))
    ]
    feasible = [c for c in candidates if epsilon(c, **PLAN) <= target]
    assert result.n_feasible == len(feasible) > 0
    assert result.epsilon <= target and result.params in feasible
    if objective == "usefulness":
        assert result.usefulness == pytest.approx(max(usefulness(c) for c in feasible), rel=1e-9)
    else:
        assert result.noise_std == pytest.approx(min(noise_std(c) for c in feasible), rel=1e-9)


def test_search_caches_per_plan_and_refuses_impossible_targets(tmp_path, monkeypatch) -> None:
    cache = tmp_path / "lmo_cache.json"
    first = search(2.0, **PLAN, grid=TINY_GRID, cache_path=cache)
    assert cache.exists()

    def boom(*args, **kwargs):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(lmo_search, "_search_uncached", boom)
    assert search(2.0, **PLAN, grid=TINY_GRID, cache_path=cache) == first
    with pytest.raises(AssertionError):  # another plan is another key
        search(2.0, **{**PLAN, "steps": 181}, grid=TINY_GRID, cache_path=cache)
    monkeypatch.undo()
    with pytest.raises(ConfigError) as info:
        search(0.01, **PLAN, grid=TINY_GRID, cache_path=cache)
    assert info.value.field == "finetune.epsilon" and "best" in info.value.problem
