"""The accountant: exact composition of ledgers, agreement with an independent library."""

import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from hypothesis import example, given, settings
from hypothesis import strategies as st

from privtune.privacy import accountant
from privtune.privacy.ledger import LedgerEntry, PrivacyLedger


def pld_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    pld = pld_privacy_accountant.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    pld.compose(event, steps)
    return pld.get_epsilon(delta)


@pytest.mark.parametrize(
    ("z", "q", "steps"), [(0.6, 0.016, 300), (1.0, 0.01, 1000), (2.0, 0.05, 200)]
)
def test_prv_agrees_with_dp_accounting_pld_within_one_percent(z, q, steps):
    ours = accountant.epsilon([(z, q, steps)], 1e-5, "prv")
    reference = pld_epsilon(z, q, steps, 1e-5)
    assert ours == pytest.approx(reference, rel=0.01)


def test_rdp_is_looser_than_prv():
    schedule = [(0.8, 0.02, 400)]
    assert accountant.epsilon(schedule, 1e-5, "rdp") > accountant.epsilon(schedule, 1e-5, "prv")


def test_heterogeneous_schedule_composes_segments():
    """Splitting a constant schedule into segments changes nothing; noisier segments spend less."""
    whole = accountant.epsilon([(1.0, 0.02, 300)], 1e-5, "rdp")
    split = accountant.epsilon([(1.0, 0.02, 100), (1.0, 0.02, 200)], 1e-5, "rdp")
    assert split == pytest.approx(whole, rel=1e-9)
    noisier = accountant.epsilon([(1.0, 0.02, 100), (2.0, 0.02, 200)], 1e-5, "rdp")
    assert noisier < whole


def test_no_noise_means_no_guarantee_and_no_steps_mean_nothing_spent():
    assert accountant.epsilon([(0.0, 0.1, 10)], 1e-5) == math.inf
    assert accountant.epsilon([], 1e-5) == 0.0


@settings(max_examples=15, deadline=None)
@given(
    target=st.floats(0.5, 10.0),
    q=st.floats(0.005, 0.1),
    steps=st.integers(20, 600),
)
def test_calibrated_noise_spends_at_most_and_nearly_the_target(target, q, steps):
    sigma = accountant.calibrate_noise(target, 1e-5, q, steps, "rdp")
    spent = accountant.epsilon([(sigma, q, steps)], 1e-5, "rdp")
    assert spent <= target
    assert spent >= 0.95 * target


def test_ledger_segments_and_round_trip(tmp_path):
    ledger = PrivacyLedger()
    for step, z in enumerate([1.0, 1.0, 2.0, 2.0, 2.0, 1.0]):
        ledger.record(LedgerEntry(step, 0.1, z, (1.0,), (z,), 3))
    assert ledger.segments() == [(1.0, 0.1, 2), (2.0, 0.1, 3), (1.0, 0.1, 1)]
    ledger.save(tmp_path / "ledger.json")
    assert PrivacyLedger.load(tmp_path / "ledger.json").entries == ledger.entries
    with pytest.raises(ValueError):
        ledger.record(LedgerEntry(7, 0.1, 0.0, (1.0,), (0.0,), 3))


def test_pld_agrees_with_prv_and_is_tighter_than_rdp():
    for schedule in ([(0.6, 0.03, 68)], [(0.6, 0.03, 30), (0.7, 0.03, 38)], [(1.0, 0.01, 1000)]):
        pld = accountant.epsilon(schedule, 1e-5, "pld")
        assert pld == pytest.approx(accountant.epsilon(schedule, 1e-5, "prv"), rel=0.01)
        assert pld < accountant.epsilon(schedule, 1e-5, "rdp")


def test_pld_composition_does_not_depend_on_how_a_schedule_is_cut():
    whole = accountant.epsilon([(0.8, 0.02, 300)], 1e-5, "pld")
    cut = accountant.epsilon([(0.8, 0.02, 100), (0.8, 0.02, 150), (0.8, 0.02, 50)], 1e-5, "pld")
    assert cut == pytest.approx(whole, rel=1e-3)
    swapped = [(1.2, 0.02, 100), (0.8, 0.02, 200)]
    assert accountant.epsilon(swapped, 1e-5, "pld") == pytest.approx(
        accountant.epsilon(swapped[::-1], 1e-5, "pld"), rel=1e-3
    )


def test_calibration_cache_is_used_only_when_it_is_safe(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVTUNE_CACHE_DIR", str(tmp_path))
    sigma = accountant.calibrate_noise(4.0, 1e-5, 0.02, 200, "pld")
    cache = tmp_path / "calibration.json"
    assert cache.is_file()
    assert accountant.calibrate_noise(4.0, 1e-5, 0.02, 200, "pld") == sigma
    # An edited (or stale) entry that would overspend is ignored and recalibrated.
    entries = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: sigma / 2 for key in entries}))
    assert accountant.calibrate_noise(4.0, 1e-5, 0.02, 200, "pld") == pytest.approx(sigma)
    cache.write_text("not json")
    assert accountant.calibrate_noise(4.0, 1e-5, 0.02, 200, "pld") == pytest.approx(sigma)
    assert accountant.epsilon([(sigma, 0.02, 200)], 1e-5, "pld") <= 4.0


@settings(max_examples=15, deadline=None)
@example(z=0.3, q=0.6219246497809273, steps=50)  # where the two differ most (7e-9 at 1e-9)
@given(
    z=st.floats(0.3, 5.0),
    q=st.floats(1e-3, 0.9),
    steps=st.integers(1, 50),
)
def test_fast_step_pld_is_dp_accountings_own(z, q, steps):
    """The vectorised step PLD is the library's, to rounding: same epsilons, same deltas.

    "To rounding" is 1e-7 relative, not machine precision: the two delta curves agree to
    1e-15, but connect-the-dots masses are second differences of that curve on a 1e-4 grid,
    which scales its rounding by about 1e8 (at z 0.3, q 0.62 the epsilons at delta 1e-9
    differ by 3e-9, either way)."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    from privtune.privacy.pld_gaussian import gaussian_step_pld

    library = pld.from_gaussian_mechanism(
        standard_deviation=z,
        sampling_prob=q,
        value_discretization_interval=accountant.PLD_INTERVAL,
        pessimistic_estimate=True,
    ).self_compose(steps)
    fast = gaussian_step_pld(z, q, accountant.PLD_INTERVAL).self_compose(steps)
    for delta in (1e-3, 1e-5, 1e-9):
        assert fast.get_epsilon_for_delta(delta) == pytest.approx(
            library.get_epsilon_for_delta(delta), rel=1e-7
        )
    epsilons = [0.05, 0.5, 2.0, 8.0]
    fast_deltas = fast.get_delta_for_epsilon(epsilons)
    library_deltas = library.get_delta_for_epsilon(epsilons)
    for a, b in zip(fast_deltas, library_deltas, strict=True):
        assert a == pytest.approx(b, rel=1e-7, abs=1e-300)


@settings(max_examples=25, deadline=None)
@given(
    schedule=st.lists(
        st.tuples(
            st.sampled_from([0.4, 0.8, 1.3, 4.0]),
            st.sampled_from([0.01, 0.2, 1.0]),
            st.integers(1, 500),
        ),
        min_size=1,
        max_size=5,
    ),  # fmt: skip
    delta=st.sampled_from([1e-3, 1e-5, 1e-9]),
)
def test_rdp_from_cached_steps_is_opacus_rdp_accountant_exactly(schedule, delta):
    """The RDP path caches each (z, q)'s one-step RDP (a pure-Python series, about 0.1 s a
    segment, that opacus' accountant recomputes for every segment at every call): what it
    returns is opacus' RDPAccountant's number to the last bit, whatever was asked before."""
    import warnings

    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    reference.history = list(accountant._merge_adjacent(schedule))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus: the best order is an end point
        expected = reference.get_epsilon(delta)
        assert accountant.epsilon(schedule, delta, "rdp") == expected
        assert accountant.epsilon(schedule, delta, "rdp") == expected  # from the cache
    step = accountant._rdp_step(0.8, 0.2, tuple(RDPAccountant.DEFAULT_ALPHAS))
    with pytest.raises(ValueError, match="read-only"):
        step *= 2  # a caller cannot change what the cache hands the next one


@pytest.mark.parametrize("method", ["pld", "rdp"])
def test_calibration_does_not_warn_of_a_loose_bound_it_never_reports(tmp_path, monkeypatch, method):
    """opacus' noise search warns at its starting z = 10 (the best RDP order is its largest
    there); the calibrated z's own epsilon is computed afterwards, so a user saw a warning
    about a bound the run never uses, once per new plan."""
    import warnings

    monkeypatch.setenv("PRIVTUNE_CACHE_DIR", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigma = accountant.calibrate_noise(1.0, 1e-5, 32 / 1010, 41, method)
    assert accountant.epsilon([(sigma, 32 / 1010, 41)], 1e-5, method) <= 1.0


def test_a_loose_rdp_bound_at_a_large_epsilon_is_not_a_warning_per_call():
    """At z 0.05 (an ε in the thousands) RDP's best order is its smallest; opacus warned of a
    loose bound on every call, a screen of it in a fine-tuning's log. The bound stands."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spent = accountant.epsilon([(0.05, 0.1, 100)], 1e-5, "rdp")
    assert spent > 1000 and math.isfinite(spent)
