"""The budget guard: no sequence of actions can end a run above the target epsilon."""

import math

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from privtune.errors import BudgetExhausted
from privtune.privacy import accountant, lmo_accounting
from privtune.privacy.guard import BudgetGuard
from privtune.privacy.ledger import LedgerEntry, PrivacyLedger
from privtune.privacy.lmo_accounting import orders_up_to
from tests.test_composition import LAW, dp_accounting_epsilon

DELTA = 1e-5


def run_schedule(requests, *, target, q, total, interval, reserve=None, acc="rdp"):
    """Drive a guard like the training loop does; return the ledger, the calibrated noise and
    how many admissions the guard refused (a refusal ends the run, as in training)."""
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
    refusals = drive(guard, ledger, requests, interval)
    return ledger, calibrated, refusals


def drive(guard: BudgetGuard, ledger: PrivacyLedger, requests, interval: int) -> int:
    """Admit one interval per request, check and record its steps; the number of refusals."""
    for request in requests:
        if len(ledger) >= guard.total_steps:
            break
        try:
            admitted = guard.admit(request, interval)
        except BudgetExhausted:
            return 1
        for _ in range(admitted.steps):
            guard.check_step(admitted.noise_multiplier)
            ledger.record(
                LedgerEntry(
                    len(ledger), guard.sample_rate, admitted.noise_multiplier, (1.0,), (1.0,), 1
                )
            )
    return 0


noise_requests = st.lists(
    st.one_of(
        st.floats(1e-4, 50.0),
        st.sampled_from([0.0, -1.0, math.nan, math.inf, 1e-9]),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=30, deadline=None, phases=(Phase.explicit, Phase.generate))
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
    """Whatever is asked (NaN, zero, negative, tiny, huge), the guard raises the noise instead
    of refusing: with a feasible reserve some noise always fits, so every request is admitted
    and the run takes every step it asked for, within the target."""
    calibrated = accountant.calibrate_noise(target, DELTA, q, total, "rdp")
    ledger, _, refusals = run_schedule(
        requests,
        target=target,
        q=q,
        total=total,
        interval=interval,
        reserve=calibrated * reserve_scale,
    )
    assert refusals == 0
    assert len(ledger) == min(total, len(requests) * interval)
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
    ledger, _, refusals = run_schedule(
        [calibrated] * total, target=target, q=q, total=total, interval=interval
    )
    assert refusals == 0 and len(ledger) == total
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
    with pytest.raises(BudgetExhausted):
        guard.check_step(float("nan"))  # an infinite clip's inf/inf: no noise to speak of
    for step in range(2):
        guard.check_step(admission.noise_multiplier)
        ledger.record(LedgerEntry(step, 0.05, admission.noise_multiplier, (1.0,), (3.0,), 1))
    with pytest.raises(BudgetExhausted):
        guard.check_step(admission.noise_multiplier)  # interval used up


def test_prv_guard_holds_the_target():
    ledger, _, refusals = run_schedule(
        [0.2, 5.0, 0.3], target=3.0, q=0.02, total=60, interval=20, reserve=4.0, acc="prv"
    )
    assert refusals == 0 and len(ledger) == 60
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


def test_check_step_refuses_a_hair_below_the_admitted_noise():
    """The per-step check is the last line: its only slack is float rounding (1e-9 relative),
    so a step a millionth below the admitted noise is refused, one at the admitted noise (or
    more) passes, and a refused step leaves the interval intact."""
    ledger, guard = _small_guard(total_steps=10)
    z = guard.admit(0.5, 3).noise_multiplier
    for below in (1 - 1e-6, 1 - 1e-3, 0.6):
        with pytest.raises(BudgetExhausted, match="below the admitted"):
            guard.check_step(z * below)
    guard.check_step(z * (1 - 1e-12))  # rounding when per-group stds are recombined
    guard.check_step(z)
    guard.check_step(z * 4)


def _reserve(target: float, q: float, total: int) -> float:
    """RDP's calibrated noise: RDP is the loosest accountant, so this reserve fits the target
    under PLD and PRV too (and costs no PLD bisection)."""
    return accountant.calibrate_noise(target, DELTA, q, total, "rdp")


@settings(max_examples=6, deadline=None, phases=(Phase.explicit, Phase.generate))
@given(
    requests=st.lists(
        st.one_of(st.floats(0.05, 8.0), st.sampled_from([0.0, math.nan, math.inf])),
        min_size=1,
        max_size=5,
    ),
    target=st.floats(0.5, 6.0),
    q=st.floats(0.01, 0.1),
    total=st.integers(5, 40),
    interval=st.integers(3, 15),
)
def test_default_pld_guard_never_overspends_and_never_refuses(requests, target, q, total, interval):
    """The default accountant (PLD): every request admitted (raised where needed), every step
    taken, and the ledger's epsilon, composed by dp-accounting itself, within the target."""
    ledger = PrivacyLedger()
    guard = BudgetGuard(
        ledger=ledger, target_epsilon=target, delta=DELTA, sample_rate=q, total_steps=total,
        reserve_noise=_reserve(target, q, total),
    )  # fmt: skip
    assert guard.accountant == "pld"
    assert drive(guard, ledger, requests, interval) == 0
    assert len(ledger) == min(total, len(requests) * interval)
    assert dp_accounting_epsilon(ledger.segments(), DELTA) <= target * (1 + 1e-6)


@pytest.mark.parametrize(
    ("requests", "target", "q", "total", "interval"), [([0.1, math.nan], 1.0, 0.02, 20, 10)]
)
def test_prv_guard_never_overspends_and_never_refuses(requests, target, q, total, interval):
    """PRV (opacus) under greedy and NaN requests: no refusal, every step, within the target by
    PRV and (to PRV's 1 % agreement with it) by dp-accounting."""
    ledger = PrivacyLedger()
    guard = BudgetGuard(
        ledger=ledger, target_epsilon=target, delta=DELTA, sample_rate=q, total_steps=total,
        reserve_noise=_reserve(target, q, total), accountant="prv",
    )  # fmt: skip
    assert drive(guard, ledger, requests, interval) == 0
    assert len(ledger) == total
    assert accountant.epsilon(ledger.segments(), DELTA, "prv") <= target
    assert dp_accounting_epsilon(ledger.segments(), DELTA) <= target * 1.01


def test_guard_over_a_ledger_holding_lmo_steps_counts_them():
    """A Gaussian interval admitted after LMO steps (a run that changed mechanism, a resumed
    ledger): the projection includes the LMO steps, so the whole ledger, composed in RDP by
    hand, stays within the target, and most of it is spent."""
    ledger = PrivacyLedger()
    for step in range(4):
        ledger.record(
            LedgerEntry(
                step, 0.05, 1.0, (1.0,), (1.0,), 8, mechanism="lmo", lmo_params=LAW.to_dict()
            )
        )
    lmo_alone = accountant.ledger_epsilon(ledger, DELTA)
    target = 2 * lmo_alone
    guard = BudgetGuard(
        ledger=ledger, target_epsilon=target, delta=DELTA, sample_rate=0.05, total_steps=24,
        reserve_noise=50.0,
    )  # fmt: skip
    assert drive(guard, ledger, [0.3, 0.3], interval=10) == 0
    orders = orders_up_to(128)
    rdp = lmo_accounting.segment_rdp(LAW, 0.05, 4)
    for z, q, n in ledger.split_segments()[0]:
        rdp = rdp + compute_rdp(q=q, noise_multiplier=z, steps=n, orders=orders)
    by_hand, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    assert len(ledger) == 24
    assert by_hand <= target * (1 + 1e-9)
    assert by_hand >= 0.9 * target  # raised to fit, not refused nor padded
