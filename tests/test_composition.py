"""Multi-rate and mixed-mechanism schedules against composition done independently of ours.

Every segment of a schedule is a (noise, sample rate, steps) triple; merging, run-length
encoding and caching must never lose the sample rate. A schedule that keeps its noise but
changes its sampling rate (a two-phase plan, a resumed run with another batch size) spends
what its separate segments spend, as the libraries compose them event by event. The
references here (dp-accounting's PLD accountant, opacus' RDP of each segment summed by hand)
never see our merged segments, so a merge keyed on the noise alone cannot agree with them.
"""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from privtune.privacy import accountant, lmo_accounting
from privtune.privacy.ledger import LedgerEntry, PrivacyLedger
from privtune.privacy.lmo import LMOParams
from privtune.privacy.lmo_accounting import orders_up_to

DELTA = 1e-5
LAW = LMOParams(a1=0.1, a3=0.1, a4=0.1, k=1.0, theta=0.5, lam=5.0, a=1.0, b=2.0)


def dp_accounting_epsilon(segments: list[tuple[float, float, int]], delta: float) -> float:
    """dp-accounting's own PLD composition, one Poisson-sampled Gaussian event per segment, at
    our discretisation interval (so the two differ by rounding, not by resolution)."""
    pld = pld_privacy_accountant.PLDAccountant(
        value_discretization_interval=accountant.PLD_INTERVAL
    )
    for z, q, n in segments:
        pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n)
    return float(pld.get_epsilon(delta))


def rdp_by_hand(segments: list[tuple[float, float, int]], delta: float) -> float:
    """opacus' RDP of each segment at its own rate (at the RDP accountant's orders), summed
    over segments, converted once."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    total = sum(
        compute_rdp(q=q, noise_multiplier=z, steps=n, orders=orders) for z, q, n in segments
    )
    eps, _ = get_privacy_spent(orders=orders, rdp=np.asarray(total), delta=delta)
    return float(eps)


def _ledger(segments: list[tuple[float, float, int]]) -> PrivacyLedger:
    ledger = PrivacyLedger()
    for z, q, n in segments:
        for _ in range(n):
            ledger.record(LedgerEntry(len(ledger), q, z, (1.0,), (z,), 8))
    return ledger


# No shrinking: a failing example is reported as drawn (each shrink step is a new numerical
# composition, minutes in all on two cores); the draw itself says what went wrong.
FAST = settings(max_examples=8, deadline=None, phases=(Phase.explicit, Phase.generate))

two_rates = st.tuples(
    st.floats(0.7, 2.0),  # one noise multiplier for both phases
    st.floats(0.01, 0.08),  # a low sampling rate ...
    st.floats(2.5, 8.0),  # ... and a high one, this many times larger
    st.integers(1, 25),
    st.integers(1, 25),
    st.booleans(),  # which phase comes first
)


def _two_phase(draw: tuple) -> list[tuple[float, float, int]]:
    z, low, factor, n1, n2, low_first = draw
    phases = [(z, low, n1), (z, min(low * factor, 0.6), n2)]
    return phases if low_first else phases[::-1]


@FAST
@given(draw=two_rates)
def test_same_noise_at_two_sampling_rates_composes_as_two_segments_pld(draw):
    """PLD (the default) of a two-rate schedule is dp-accounting's composition of the two
    events; merged by noise alone, the phase at the larger rate would be priced at the
    smaller one (a schedule's 40 reported as 0.9)."""
    schedule = _two_phase(draw)
    ours = accountant.epsilon(schedule, DELTA, "pld")
    assert ours == pytest.approx(dp_accounting_epsilon(schedule, DELTA), rel=2e-3)


@FAST
@given(draw=two_rates)
def test_same_noise_at_two_sampling_rates_composes_as_two_segments_rdp(draw):
    schedule = _two_phase(draw)
    ours = accountant.epsilon(schedule, DELTA, "rdp")
    assert ours == pytest.approx(rdp_by_hand(schedule, DELTA), rel=1e-9)


def test_same_noise_at_two_sampling_rates_prv():
    """PRV (opacus) composes the history it is given: it must be given both rates."""
    schedule = [(1.0, 0.02, 40), (1.0, 0.2, 40)]
    reference = dp_accounting_epsilon(schedule, DELTA)
    assert accountant.epsilon(schedule, DELTA, "prv") == pytest.approx(reference, rel=0.02)
    # the phase at q = 0.2 dominates: far more than the q = 0.02 phase alone, twice over
    assert reference > 2 * dp_accounting_epsilon([(1.0, 0.02, 80)], DELTA)


@FAST
@given(draw=two_rates)
def test_a_two_rate_ledger_keeps_its_rates_and_spends_what_its_segments_spend(draw):
    """The ledger's run-length encoding starts a new segment when the rate changes, and the
    ledger's epsilon (default accountant) is the library's composition of its steps."""
    schedule = _two_phase(draw)
    ledger = _ledger(schedule)
    assert ledger.segments() == schedule
    gaussian, lmo = ledger.split_segments()
    assert (gaussian, lmo) == (schedule, [])
    reference = dp_accounting_epsilon(schedule, DELTA)
    assert accountant.ledger_epsilon(ledger, DELTA) == pytest.approx(reference, rel=2e-3)


def test_lmo_steps_at_two_sampling_rates_are_two_segments():
    """LMO segments keep their rate too: RDP of each, summed by hand, converted once."""
    ledger = PrivacyLedger()
    rates = [0.02] * 3 + [0.3] * 4
    for step, q in enumerate(rates):
        ledger.record(
            LedgerEntry(step, q, 1.0, (1.0,), (1.0,), 8, mechanism="lmo", lmo_params=LAW.to_dict())
        )
    assert ledger.split_segments() == ([], [(LAW, 0.02, 3), (LAW, 0.3, 4)])
    orders = orders_up_to(128)
    rdp = lmo_accounting.segment_rdp(LAW, 0.02, 3) + lmo_accounting.segment_rdp(LAW, 0.3, 4)
    by_hand, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    assert accountant.ledger_epsilon(ledger, DELTA) == pytest.approx(by_hand, rel=1e-12)


def test_mixed_mechanisms_at_several_rates_compose_in_rdp_by_hand():
    """Gaussian steps at two rates around LMO steps: every segment's RDP counted once at its
    own rate, whatever the order of the steps in the ledger."""
    ledger = PrivacyLedger()
    plan = [("g", 1.2, 0.05, 3), ("lmo", None, 0.1, 2), ("g", 1.2, 0.25, 2), ("g", 0.9, 0.25, 1)]
    for kind, z, q, n in plan:
        for _ in range(n):
            if kind == "g":
                ledger.record(LedgerEntry(len(ledger), q, z, (1.0,), (z,), 8))
            else:
                entry = LedgerEntry(
                    len(ledger), q, 1.0, (1.0,), (1.0,), 8, mechanism="lmo",
                    lmo_params=LAW.to_dict(),
                )  # fmt: skip
                ledger.record(entry)
    orders = orders_up_to(128)
    rdp = lmo_accounting.segment_rdp(LAW, 0.1, 2)
    for z, q, n in [(1.2, 0.05, 3), (1.2, 0.25, 2), (0.9, 0.25, 1)]:
        rdp = rdp + compute_rdp(q=q, noise_multiplier=z, steps=n, orders=orders)
    by_hand, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    for name in accountant.ACCOUNTANTS:  # a ledger with LMO steps composes in RDP whatever asked
        assert accountant.ledger_epsilon(ledger, DELTA, name) == pytest.approx(by_hand, rel=1e-12)
    segments = [(1.2, 0.05, 3), (LAW, 0.1, 2), (1.2, 0.25, 2), (0.9, 0.25, 1)]
    assert accountant.compose(segments, DELTA) == pytest.approx(by_hand, rel=1e-12)
