"""The budget guard: no sequence of actions can end a run above the target epsilon."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.errors import BudgetExhausted
from privtune.privacy import accountant
from privtune.privacy.guard import BudgetGuard
from privtune.privacy.ledger import LedgerEntry, PrivacyLedger

DELTA = 1e-5


def run_schedule(requests, *, target, q, total, interval, reserve=None, acc="rdp"):
    """Drive a guard like the training loop does; return the ledger."""
    ledger = PrivacyLedger()
    calibrated = accountant.calibrate_noise(target, DELTA, q, total, acc)
    guard = BudgetGuard(
        ledger=ledger,
        target_epsilon=target,
        delta=DELTA,
        sample_rate=q,
        total_steps=total,
        reserve_noise=reserve or calibrated,
        accountant=acc,
    )
    step = 0
    for request in requests:
        if step >= total:
            break
        try:
            admitted = guard.admit(request, interval)
        except BudgetExhausted:
            break
        for _ in range(admitted.steps):
            guard.check_step(admitted.noise_multiplier)
            ledger.record(LedgerEntry(step, q, admitted.noise_multiplier, (1.0,), (1.0,), 1))
            step += 1
    return ledger, calibrated


noise_requests = st.lists(
    st.one_of(
        st.floats(1e-4, 50.0),
        st.sampled_from([0.0, -1.0, math.nan, math.inf, 1e-9]),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=30, deadline=None)
@given(
    requests=noise_requests,
    target=st.floats(0.3, 10.0),
    q=st.floats(0.005, 0.2),
    total=st.integers(5, 400),
    interval=st.integers(1, 50),
    reserve_scale=st.floats(1.0, 5.0),
)
def test_random_and_adversarial_actions_never_overspend(
    requests, target, q, total, interval, reserve_scale
):
    calibrated = accountant.calibrate_noise(target, DELTA, q, total, "rdp")
    ledger, _ = run_schedule(
        requests,
        target=target,
        q=q,
        total=total,
        interval=interval,
        reserve=calibrated * reserve_scale,
    )
    assert accountant.epsilon(ledger.segments(), DELTA, "rdp") <= target * (1 + 1e-9)


@settings(max_examples=12, deadline=None)
@given(
    target=st.floats(0.5, 10.0),
    q=st.floats(0.005, 0.1),
    total=st.integers(20, 400),
    interval=st.integers(1, 100),
)
def test_well_behaved_schedule_uses_at_least_95_percent_of_budget(target, q, total, interval):
    """Asking for the calibrated noise every interval spends (nearly) the whole budget."""
    calibrated = accountant.calibrate_noise(target, DELTA, q, total, "rdp")
    ledger, _ = run_schedule(
        [calibrated] * total, target=target, q=q, total=total, interval=interval
    )
    assert len(ledger) == total
    spent = accountant.epsilon(ledger.segments(), DELTA, "rdp")
    assert 0.95 * target <= spent <= target


def _small_guard(total_steps: int) -> tuple[PrivacyLedger, BudgetGuard]:
    ledger = PrivacyLedger()
    guard = BudgetGuard(
        ledger=ledger,
        target_epsilon=2.0,
        delta=DELTA,
        sample_rate=0.05,
        total_steps=total_steps,
        reserve_noise=3.0,
        accountant="rdp",
    )
    return ledger, guard


def test_greedy_request_is_raised_to_fit():
    ledger, guard = _small_guard(total_steps=100)
    admission = guard.admit(0.1, 50)
    assert admission.raised and admission.noise_multiplier > 0.1
    assert admission.projected_epsilon <= 2.0


def test_steps_outside_the_admitted_interval_are_refused():
    ledger, guard = _small_guard(total_steps=10)
    with pytest.raises(BudgetExhausted):
        guard.check_step(3.0)  # nothing admitted yet
    admission = guard.admit(3.0, 2)
    with pytest.raises(BudgetExhausted):
        guard.check_step(admission.noise_multiplier / 2)  # below the admitted noise
    for step in range(2):
        guard.check_step(admission.noise_multiplier)
        ledger.record(LedgerEntry(step, 0.05, admission.noise_multiplier, (1.0,), (3.0,), 1))
    with pytest.raises(BudgetExhausted):
        guard.check_step(admission.noise_multiplier)  # interval used up


def test_prv_guard_holds_the_target():
    ledger, _ = run_schedule(
        [0.2, 5.0, 0.3], target=3.0, q=0.02, total=60, interval=20, reserve=4.0, acc="prv"
    )
    assert accountant.epsilon(ledger.segments(), DELTA, "prv") <= 3.0


@settings(max_examples=25, deadline=None)
@given(
    request=st.floats(1e-3, 3.0),
    steps=st.integers(1, 60),
    reserve=st.floats(1.0, 6.0),
    target=st.floats(0.5, 8.0),
)
def test_a_raised_noise_is_the_least_that_fits(request, steps, reserve, target):
    """Raised, the admitted z fits and z / (1 + rtol) would not: no noise beyond the need
    (extra noise is utility thrown away), found with few projections (each is a new PLD)."""
    guard = BudgetGuard(
        ledger=PrivacyLedger(), target_epsilon=target, delta=DELTA, sample_rate=0.05,
        total_steps=60, reserve_noise=reserve, accountant="rdp",
    )  # fmt: skip
    if guard.projected(guard.max_noise, steps) > target:
        with pytest.raises(BudgetExhausted):
            guard.admit(request, steps)
        return
    calls = []
    projected = guard.projected
    guard.projected = lambda z, n: calls.append(z) or projected(z, n)
    admission = guard.admit(request, steps)
    assert projected(admission.noise_multiplier, steps) <= target
    assert admission.projected_epsilon == projected(admission.noise_multiplier, steps)
    if admission.raised:
        assert projected(admission.noise_multiplier / (1 + guard.rtol), steps) > target
        assert len(calls) <= 16  # bisection from a doubling bracket took about 15
    else:
        assert admission.noise_multiplier == request
