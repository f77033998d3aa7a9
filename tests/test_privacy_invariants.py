"""Invariants of the privacy core that mutation testing found unguarded (issue 21, `make mutate`).

Each expectation is computed independently of the code under test: by hand, or by the
libraries the accountant must agree with (dp-accounting's PLD, opacus' RDP).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.config import parse_params
from privtune.errors import BudgetExhausted, ConfigError
from privtune.privacy import accountant
from privtune.privacy.action import Action
from privtune.privacy.guard import BudgetGuard
from privtune.privacy.ledger import LedgerEntry, PrivacyLedger
from privtune.privacy.mechanisms.gaussian import admit_gaussian, effective_noise_multiplier
from privtune.privacy.plan import default_delta, make_plan
from tests.test_composition import LAW

DELTA = 1e-5


def _gaussian(step: int, q: float = 0.1, z: float = 1.0) -> LedgerEntry:
    return LedgerEntry(step, q, z, (1.0,), (z,), 4)


def _lmo(step: int, q: float = 0.1) -> LedgerEntry:
    return LedgerEntry(step, q, 1.0, (1.0,), (1.0,), 4, mechanism="lmo", lmo_params=LAW.to_dict())


# -- the ledger ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("z", "q"), [(0.0, 0.1), (-1.0, 0.1), (1.0, 0.0), (1.0, -0.1)])
def test_a_step_without_noise_or_sampling_is_refused(z: float, q: float) -> None:
    with pytest.raises(ValueError, match="noise_multiplier > 0 and sample_rate > 0"):
        PrivacyLedger().record(_gaussian(0, q=q, z=z))


def test_a_ledger_saved_before_mechanisms_reads_as_gaussian(tmp_path) -> None:
    """Entries saved before `mechanism`, `count_dims` and `lmo_params` existed are Gaussian
    steps releasing (at most) one count; the file keeps format version 1."""
    old = {
        "version": 1,
        "entries": [
            {
                "step": s,
                "sample_rate": 0.1,
                "noise_multiplier": 1.5,
                "clip_thresholds": [1.0],
                "noise_stds": [1.5],
                "batch_size": 3,
                "count_noise_std": 2.0,
            }
            for s in range(3)
        ],
    }
    ledger = PrivacyLedger.from_state_dict(old)
    assert [(e.mechanism, e.count_dims, e.lmo_params) for e in ledger.entries] == [
        ("gaussian", 1, None)
    ] * 3
    assert ledger.segments() == [(1.5, 0.1, 3)]
    assert ledger.state_dict()["version"] == 1
    ledger.save(tmp_path / "ledger.json")
    assert PrivacyLedger.load(tmp_path / "ledger.json").entries == ledger.entries
    # a step that released a histogram of 6 counts reads back as one
    histogram = LedgerEntry(3, 0.1, 1.5, (1.0,), (1.6,), 3, count_noise_std=4.0, count_dims=6)
    ledger.record(histogram)
    ledger.save(tmp_path / "ledger.json")
    assert PrivacyLedger.load(tmp_path / "ledger.json").entries[-1] == histogram


def test_gaussian_segments_refuse_a_ledger_holding_lmo_steps() -> None:
    ledger = PrivacyLedger()
    ledger.record(_gaussian(0))
    ledger.record(_lmo(1))
    with pytest.raises(ValueError, match="ledger_epsilon"):
        ledger.segments()
    assert ledger.split_segments() == ([(1.0, 0.1, 1)], [(LAW, 0.1, 1)])


def test_runs_are_split_where_noise_rate_or_mechanism_change() -> None:
    ledger = PrivacyLedger()
    plan = [(0.1, 1.0), (0.1, 1.0), (0.1, 2.0), (0.2, 2.0), (0.2, 2.0)]
    for step, (q, z) in enumerate(plan):
        ledger.record(_gaussian(step, q=q, z=z))
    for step in range(5, 7):
        ledger.record(_lmo(step, q=0.2))
    ledger.record(_gaussian(7, q=0.2, z=2.0))
    gaussian, lmo = ledger.split_segments()
    assert gaussian == [(1.0, 0.1, 2), (2.0, 0.1, 1), (2.0, 0.2, 2), (2.0, 0.2, 1)]
    assert lmo == [(LAW, 0.2, 2)]
    assert len(ledger) == 8


def test_an_lmo_entry_is_read_only_from_an_lmo_step() -> None:
    with pytest.raises(ValueError, match="is a gaussian step, not lmo"):
        _gaussian(3).lmo()
    assert _lmo(4).lmo() == LAW


# -- composition edge cases ---------------------------------------------------------------------


def test_empty_and_zero_step_segments_spend_nothing_in_every_accountant() -> None:
    for name in accountant.ACCOUNTANTS:
        assert accountant.epsilon([(1.0, 0.1, 0)], DELTA, name) == 0.0
        assert accountant.composed_epsilon([(1.0, 0.1, 0)], [(LAW, 0.1, 0)], DELTA, name) == 0.0
    alone = accountant.composed_epsilon([], [(LAW, 0.1, 3)], DELTA)
    with_empty = accountant.composed_epsilon([(0.5, 0.1, 0)], [(LAW, 0.1, 3)], DELTA)
    assert with_empty == alone > 0


def test_a_noiseless_gaussian_step_beside_lmo_steps_has_no_guarantee() -> None:
    assert accountant.composed_epsilon([(0.0, 0.1, 1)], [(LAW, 0.1, 3)], DELTA) == math.inf
    assert accountant.compose([(LAW, 0.1, 3), (-1.0, 0.1, 2)], DELTA) == math.inf


def test_an_unknown_accountant_is_refused_whatever_the_schedule() -> None:
    """A misspelt accountant is an error even where no accountant is needed (nothing spent,
    or no noise at all), so a typo in params.yaml is caught on the first call, not late."""
    for schedule in ([(1.0, 0.1, 3)], [], [(1.0, 0.1, 0)], [(0.0, 0.1, 3)], [(-0.0, 0.1, 3)]):
        with pytest.raises(ValueError) as err:
            accountant.epsilon(schedule, DELTA, "moments")
        assert str(err.value) == "unknown accountant 'moments': use one of pld, prv, rdp"


def test_a_schedule_without_noise_has_no_guarantee_under_every_accountant() -> None:
    """z = 0 (or -0.0) anywhere in a schedule: epsilon is infinite, by every accountant, and
    said at once, not by an RDP curve of infinities (whose opacus warning, "consider
    expanding the range of alphas", would send a user the wrong way)."""
    import warnings

    for name in accountant.ACCOUNTANTS:
        for z in (0.0, -0.0):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert accountant.epsilon([(1.0, 0.1, 3), (z, 0.1, 1)], DELTA, name) == math.inf


def test_adjacent_segments_merge_only_at_the_same_noise_and_rate() -> None:
    """A constant schedule cut by the guard (ledger so far, next interval, the rest) is one
    segment again; a change of z or of q starts a new one, even back to an earlier pair."""
    cut = [(1.0, 0.1, 3), (1.0, 0.1, 4), (1.0, 0.2, 2), (2.0, 0.2, 5), (1.0, 0.1, 1)]
    assert accountant._merge_adjacent(cut) == [
        (1.0, 0.1, 7), (1.0, 0.2, 2), (2.0, 0.2, 5), (1.0, 0.1, 1),
    ]  # fmt: skip
    assert accountant._merge_adjacent([]) == []


# -- the training plan --------------------------------------------------------------------------


def _finetune(**changes: object):
    return parse_params({"finetune": {"audit_canaries": 0, **changes}}).finetune


def test_the_plan_by_hand() -> None:
    """N = 400, B = 40, 2.5 epochs: q = 0.1, ceil(2.5 / 0.1) = 25 steps, delta 1/(10 N)."""
    plan = make_plan(400, _finetune(batch_size=40, epochs=2.5), private=False)
    assert (plan.n_records, plan.sample_rate, plan.steps) == (400, 0.1, 25)
    assert plan.delta == pytest.approx(2.5e-4) and plan.calibrated_noise == 0.0
    assert plan.expected_batch_size == pytest.approx(40.0)
    # a fraction of a step is a whole step; a tiny number of epochs is still one step
    assert make_plan(400, _finetune(batch_size=40, epochs=2.51), private=False).steps == 26
    assert make_plan(400, _finetune(batch_size=40, epochs=0.01), private=False).steps == 1


def test_a_private_plan_spends_at_most_its_epsilon() -> None:
    params = _finetune(batch_size=40, epochs=1.0, epsilon=3.0, accountant="rdp")
    plan = make_plan(400, params, private=True)
    spent = accountant.epsilon([(plan.calibrated_noise, 0.1, 10)], plan.delta, "rdp")
    assert 0.95 * 3.0 <= spent <= 3.0


def test_plan_boundaries() -> None:
    # two records are the fewest that can be sampled; a batch of all records is q = 1
    assert make_plan(2, _finetune(batch_size=2, epochs=1.0), private=False).sample_rate == 1.0
    with pytest.raises(ConfigError) as err:
        make_plan(1, _finetune(batch_size=1), private=False)
    assert str(err.value) == "data: only 1 training records. Fix: provide more records"
    with pytest.raises(ConfigError) as err:
        make_plan(40, _finetune(batch_size=41), private=False)
    assert str(err.value) == (
        "finetune.batch_size: 41 is larger than the N = 40 training records (audit canaries "
        "included). Fix: set finetune.batch_size to at most 40 (typically N/10 to N/30)"
    )
    # delta must be strictly below 1/N (a private plan's: one without noise claims no delta)
    assert make_plan(1000, _finetune(delta=1e-3), private=False).delta == 1e-3
    with pytest.raises(ConfigError) as err:
        make_plan(1000, _finetune(delta=1e-3), private=True)
    assert str(err.value) == (
        "finetune.delta: 0.001 is not below 1/N = 0.001 for N = 1000 records. "
        "Fix: set finetune.delta below 0.001 (e.g. 0.0001, or null for that default)"
    )
    assert make_plan(1000, _finetune(delta=0.999e-3), private=True).delta == 0.999e-3
    # the registry's delta gate: equality is allowed, above it is refused
    assert make_plan(1000, _finetune(delta=1e-4), private=True, max_delta=1e-4).delta == 1e-4
    with pytest.raises(ConfigError) as err:
        make_plan(1000, _finetune(delta=1.0001e-4), private=True, max_delta=1e-4)
    assert str(err.value) == (
        "finetune.delta: 0.00010001 exceeds the registry's delta gate registry.gates.max_delta "
        "= 0.0001: the model would be trained and then refused promotion. Fix: set "
        "finetune.delta to at most 0.0001 (or null: 1/(10 N) capped by the gate), or raise "
        "registry.gates.max_delta if your privacy officer agrees"
    )
    assert default_delta(1000) == pytest.approx(1e-4)
    assert default_delta(1000, max_delta=5e-5) == 5e-5
    assert default_delta(100_000, max_delta=5e-5) == pytest.approx(1e-6)


# -- the budget guard's admission ---------------------------------------------------------------


def _guard(total: int = 10, reserve: float = 3.0, target: float = 2.0) -> BudgetGuard:
    return BudgetGuard(
        ledger=PrivacyLedger(), target_epsilon=target, delta=DELTA, sample_rate=0.05,
        total_steps=total, reserve_noise=reserve, accountant="rdp",
    )  # fmt: skip


def _take(guard: BudgetGuard, z: float, n: int) -> None:
    for _ in range(n):
        guard.check_step(z)
        guard.ledger.record(_gaussian(len(guard.ledger), q=guard.sample_rate, z=z))


def test_a_request_that_fits_is_admitted_as_asked_for_the_steps_left() -> None:
    """At z = 3 (the reserve) ten steps at q = 0.05 spend far less than 2: nothing is raised,
    the interval is cut to the steps left, and the projection is the RDP of the whole run."""
    guard = _guard()
    admission = guard.admit(3.0, 4)
    assert (admission.noise_multiplier, admission.steps, admission.raised) == (3.0, 4, False)
    by_hand = accountant.epsilon([(3.0, 0.05, 10)], DELTA, "rdp")
    assert admission.projected_epsilon == pytest.approx(by_hand, rel=1e-12)
    _take(guard, 3.0, 4)
    assert guard.admit(4.0, 100).steps == 6  # only six steps are left
    assert guard.projected(4.0, 100) == pytest.approx(
        accountant.epsilon([(3.0, 0.05, 4), (4.0, 0.05, 6)], DELTA, "rdp"), rel=1e-12
    )
    _take(guard, 4.0, 5)
    last = guard.admit(4.0, 3)  # one step left: admitted, not refused
    assert last.steps == 1
    _take(guard, 4.0, 1)
    with pytest.raises(BudgetExhausted, match="the planned number of steps has been taken"):
        guard.admit(4.0, 1)
    assert guard.spent() == pytest.approx(
        accountant.epsilon([(3.0, 0.05, 4), (4.0, 0.05, 6)], DELTA, "rdp"), rel=1e-12
    )


@pytest.mark.parametrize("request_", [0.0, -2.0, math.nan])
def test_a_request_without_noise_gets_the_reserve(request_: float) -> None:
    admission = _guard().admit(request_, 5)
    assert (admission.noise_multiplier, admission.raised) == (3.0, False)


def test_an_infinite_request_is_capped_at_the_guards_largest_noise() -> None:
    guard = _guard()
    assert guard.admit(math.inf, 5).noise_multiplier == guard.max_noise == 1e3


def test_when_even_the_largest_noise_cannot_fit_the_run_stops() -> None:
    guard = _guard(target=2.0)
    guard.ledger.record(_gaussian(0, q=0.05, z=0.05))  # one step that spent far beyond 2
    guard._allowed_until = 1
    with pytest.raises(BudgetExhausted, match="even noise multiplier 1000.0 cannot keep the run"):
        guard.admit(0.5, 3)


def test_a_guard_resumed_from_its_state_admits_the_same_interval() -> None:
    guard = _guard()
    admission = guard.admit(0.2, 4)  # greedy: raised
    assert admission.raised and admission.noise_multiplier > 0.2
    _take(guard, admission.noise_multiplier, 2)
    resumed = _guard(reserve=7.0)
    resumed.ledger = guard.ledger
    resumed.load_state_dict(guard.state_dict())
    assert resumed.reserve_noise == 3.0
    assert resumed.state_dict() == {
        "allowed_until": 4,
        "admitted_noise": admission.noise_multiplier,
        "reserve_noise": 3.0,
    }
    _take(resumed, admission.noise_multiplier, 2)  # the rest of the admitted interval
    with pytest.raises(BudgetExhausted, match="call admit"):
        resumed.check_step(admission.noise_multiplier)


def test_a_guard_needs_a_positive_reserve() -> None:
    for reserve in (0.0, -1.0):
        with pytest.raises(ValueError, match="reserve_noise must be > 0"):
            _guard(reserve=reserve)
    assert _guard(reserve=0.5).reserve_noise == 0.5


# -- the Gaussian mechanism's admission: gradient and counts share the admitted z ----------------


def test_counts_leave_the_gradient_the_rest_of_the_admitted_noise() -> None:
    """z = 1 with one count of std 2: z_grad^-2 = 1 - (1/2 / 2)^2 = 15/16."""
    action = Action((1.0,), 1.0, count_noise=2.0)
    admitted, stds, count_std = admit_gaussian(action, 1.0, 1)
    assert count_std == 2.0 and admitted.noise_multiplier == 1.0
    assert stds[0] == pytest.approx((16 / 15) ** 0.5, rel=1e-8)
    assert stds[0] >= (16 / 15) ** 0.5  # a hair more, never less
    # a histogram of 2 groups x 2 levels (4 counts) of std 1.5: z_grad^-2 = 1 - 4 / 9
    action = Action((1.0, 1.0), 1.0, count_noise=1.5, count_levels=(0.5, 1.0))
    _, stds, count_std = admit_gaussian(action, 1.0, 2)
    assert count_std == 1.5
    assert stds == pytest.approx(((9 / 5) ** 0.5 * 2**0.5,) * 2, rel=1e-8)


def test_a_count_too_noisy_for_the_admitted_z_is_raised_to_leave_room() -> None:
    """Counts of std sigma_b need z < 2 sigma_b / sqrt(D); at or past that the count noise is
    raised to z sqrt(D), a quarter of the step's budget: z_grad^-2 = z^-2 (1 - 1/4)."""
    for count_noise, dims, levels in [(0.4, 1, ()), (0.5, 1, ()), (0.9, 4, (0.5, 1.0))]:
        n_groups = 2 if levels else 1
        action = Action((1.0,) * n_groups, 1.0, count_noise=count_noise, count_levels=levels)
        _, stds, count_std = admit_gaussian(action, 1.0, n_groups)
        assert count_std == pytest.approx(dims**0.5, rel=1e-12)
        total = effective_noise_multiplier((1.0,) * n_groups, stds, count_std, dims)
        assert total == pytest.approx(1.0, rel=1e-8) and total >= 1.0
    # just above the limit, the requested count noise is kept
    _, _, count_std = admit_gaussian(Action((1.0,), 1.0, count_noise=0.5001), 1.0, 1)
    assert count_std == 0.5001


def test_explicit_group_stds_are_scaled_up_to_the_admitted_noise_never_down() -> None:
    """Clips (1, 2) with stds (2, 2) request z = 1 / sqrt(1/4 + 1); admitted 1.5, both stds
    grow by 1.5 / that; admitted below the request, the stds stay (more noise is allowed)."""
    requested = 1 / math.sqrt(1 / 4 + 1)
    action = Action((1.0, 2.0), requested, noise_stds=(2.0, 2.0))
    admitted, stds, _ = admit_gaussian(action, 1.5, 2)
    assert stds == pytest.approx((2 * 1.5 / requested,) * 2, rel=1e-12)
    assert admitted.noise_multiplier == pytest.approx(1.5, rel=1e-12)
    assert admitted.noise_stds == stds
    lower, stds, _ = admit_gaussian(action, 0.5, 2)
    assert stds == (2.0, 2.0) and lower.noise_multiplier == pytest.approx(requested, rel=1e-12)


# -- defaults and where the calibration cache lives ---------------------------------------------


def test_the_default_accountant_is_pld_everywhere() -> None:
    """epsilon, compose, composed_epsilon and ledger_epsilon default to PLD (dp-accounting's
    composition here, not the looser RDP)."""
    from tests.test_composition import dp_accounting_epsilon

    schedule = [(1.0, 0.1, 3)]
    reference = dp_accounting_epsilon(schedule, DELTA)
    ledger = PrivacyLedger()
    for step in range(3):
        ledger.record(_gaussian(step))
    for spent in (
        accountant.epsilon(schedule, DELTA),
        accountant.compose(schedule, DELTA),
        accountant.composed_epsilon(schedule, [], DELTA),
        accountant.ledger_epsilon(ledger, DELTA),
    ):
        assert spent == pytest.approx(reference, rel=2e-3)
    assert reference < accountant.epsilon(schedule, DELTA, "rdp")


def test_the_calibration_cache_defaults_to_the_users_cache_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("PRIVTUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    sigma = accountant.calibrate_noise(2.0, DELTA, 0.05, 40, "rdp")
    cache = tmp_path / ".cache" / "privtune" / "calibration.json"
    entries = json.loads(cache.read_text())
    assert list(entries.values()) == [sigma]
    (key,) = entries
    assert key.split("|")[1:] == ["'rdp'", "2.0", "1e-05", "0.05", "40"]
    cache.write_text("[1.0, 2.0]")  # JSON, but not a cache: ignored and rewritten
    assert accountant.calibrate_noise(2.0, DELTA, 0.05, 40, "rdp") == sigma
    assert json.loads(cache.read_text()) == entries


def test_ledger_errors_say_exactly_what_is_wrong() -> None:
    ledger = PrivacyLedger()
    ledger.record(_lmo(0))
    with pytest.raises(ValueError) as err:
        ledger.segments()
    assert str(err.value) == (
        "this ledger holds non-Gaussian (lmo) steps: compose it with "
        "accountant.ledger_epsilon, not as Gaussian segments"
    )
    with pytest.raises(ValueError) as err:
        PrivacyLedger().record(_gaussian(0, z=0.0))
    assert str(err.value) == "a private step needs noise_multiplier > 0 and sample_rate > 0"
    gaussian_with_law = LedgerEntry(0, 0.1, 1.0, (1.0,), (1.0,), 4, lmo_params=LAW.to_dict())
    with pytest.raises(ValueError) as err:
        PrivacyLedger().record(gaussian_with_law)
    assert str(err.value) == "a gaussian step must not carry lmo_params"
    with pytest.raises(ValueError) as err:
        accountant.epsilon([(1.0, 0.1, 3)], DELTA, "moments")
    assert str(err.value) == "unknown accountant 'moments': use one of pld, prv, rdp"


# -- reached by no other fast test: N with the audit's canaries, PLD calibration, the LMO shift --


def test_n_counts_the_audits_in_canaries_as_records() -> None:
    """N is the texts plus the canaries whose secret coin is IN (about half of them): the
    audit's own count of its IN canaries for that seed, never the OUT ones."""
    from privtune.privacy.gradient_canaries import included_count
    from privtune.privacy.plan import planned_records

    assert planned_records(300, _finetune()) == 300  # no canaries
    params = _finetune(audit_canaries=64, seed=3)
    in_canaries = planned_records(300, params) - 300
    assert 16 < in_canaries < 48 and in_canaries == included_count(64, 3)
    assert planned_records(0, params) == in_canaries  # nothing but canaries: still counted


def test_an_epsilon_below_rdps_floor_is_calibrated_by_pld_or_refused_naming_the_accountant(
    tmp_path, monkeypatch
) -> None:
    """RDP's conversion has a floor (about 0.066 at 41 steps, q 0.031, delta 9.7e-5): below it
    opacus gave up ("The privacy budget is too low.") and the finetune stage crashed (exit 5).
    PLD certifies such an epsilon with enough noise, still the least that does; the RDP
    accountant says it cannot, and past MAX_NOISE nothing does."""
    monkeypatch.setenv("PRIVTUNE_CACHE_DIR", str(tmp_path))
    q, steps, delta, target = 0.031, 41, 9.7e-5, 0.05
    z = accountant.calibrate_noise(target, delta, q, steps, "pld")
    assert accountant.epsilon([(z, q, steps)], delta, "pld") <= target
    assert accountant.epsilon([(z / 1.002, q, steps)], delta, "pld") > target
    with pytest.raises(accountant.InfeasibleBudget, match="rdp accountant cannot certify"):
        accountant.calibrate_noise(target, delta, q, steps, "rdp")
    monkeypatch.setattr(accountant, "MAX_NOISE", 100.0)
    with pytest.raises(accountant.InfeasibleBudget, match="pld accountant cannot certify"):
        accountant.calibrate_noise(1e-4, delta, q, steps, "pld")


def test_pld_calibration_is_the_least_noise_that_keeps_the_target(monkeypatch) -> None:
    """The bisection's z spends at most the target under PLD (checked against dp-accounting's
    own composition), a hair less noise (0.2 %, twice its tolerance) overspends, and RDP, looser,
    would call it too little."""
    from tests.test_composition import dp_accounting_epsilon

    q, steps, target = 0.05, 10, 1.0
    z = accountant._calibrate_by_bisection(target, DELTA, q, steps, "pld")
    assert dp_accounting_epsilon([(z, q, steps)], DELTA) <= target * (1 + 1e-3)
    assert accountant.epsilon([(z, q, steps)], DELTA) <= target
    assert accountant.epsilon([(z / 1.002, q, steps)], DELTA) > target
    assert z > 0.5 and accountant.epsilon([(z, q, steps)], DELTA, "rdp") > target
    # from a bracket far too loose (8 times the answer) it halves down, then bisects, to the
    # same least noise
    monkeypatch.setattr(accountant, "_calibrate", lambda *args: 8 * z)
    again = accountant._calibrate_by_bisection(target, DELTA, q, steps, "pld")
    assert accountant.epsilon([(again, q, steps)], DELTA) <= target
    assert accountant.epsilon([(again / 1.002, q, steps)], DELTA) > target


def _fake_search(monkeypatch, bracket: float, spend) -> list[float]:
    """Point the bisection at a bracket and a monotone spend(z) standing in for PLD's epsilon:
    the search's own logic, checked against answers worked out by hand. Returns the probes."""
    probes: list[float] = []

    def fake_epsilon(segments, delta, accountant_name="pld"):
        ((z, _q, _steps),) = segments
        probes.append(z)
        return spend(z)

    monkeypatch.setattr(accountant, "_calibrate", lambda *args: bracket)
    monkeypatch.setattr(accountant, "epsilon", fake_epsilon)
    return probes


@pytest.mark.parametrize("bracket", [1.0, 8.0])
def test_bisection_returns_the_least_noise_exactly_when_it_meets_it(monkeypatch, bracket) -> None:
    """spend(z) = 1/z with target 1 (bracket 8) or 2 (bracket 1): the least z that keeps the
    target is 1 or 0.5, a halving of the bracket, where the spend EQUALS the target. "At most
    the target" admits it, and the search returns it exactly, not a z above it."""
    target = 8.0 / bracket
    _fake_search(monkeypatch, bracket, lambda z: 1.0 / z)
    z = accountant._calibrate_by_bisection(target, DELTA, 0.1, 10, "pld")
    assert z == 1.0 / target


def test_bisection_accepts_a_midpoint_that_spends_exactly_the_target(monkeypatch) -> None:
    """Spend falls from 2 to exactly the target 1 at m = sqrt(2 * 4), the first midpoint of
    the bracket [2, 4]: m keeps the target ("at most"), so it is the least noise, returned
    exactly; treating equality as overspending would walk the search up to 4."""
    m = math.sqrt(2.0 * 4.0)
    _fake_search(monkeypatch, 4.0, lambda z: 1.0 if z >= m else 2.0)
    assert accountant._calibrate_by_bisection(1.0, DELTA, 0.1, 10, "pld") == m


def test_bisection_stops_once_the_bracket_is_within_its_tolerance(monkeypatch) -> None:
    """Bracket [0.5, 1] (its low end overspends: 1/0.5 = 2 > 1.6) has high/low = 2, which is
    1 + rtol at rtol = 1: already within tolerance, so the bracket's safe end, 1, is returned
    without a further probe (the least z, 0.625, lies inside it)."""
    probes = _fake_search(monkeypatch, 1.0, lambda z: 1.0 / z)
    assert accountant._calibrate_by_bisection(1.6, DELTA, 0.1, 10, "pld", rtol=1.0) == 1.0
    assert probes == [0.5]


@pytest.mark.parametrize(
    ("bracket", "expected"), [(0.008, 0.001), (1.5e-3, 7.5e-4), (0.1, 0.1 / 64)]
)
def test_bisection_gives_up_halving_below_a_thousandth(monkeypatch, bracket, expected) -> None:
    """When every z keeps the target (spend 0), the search halves the bracket until the next
    half would be below 1e-3 and returns the last half it probed: h/2^k with k the least k >= 1
    such that h/2^(k+1) < 1e-3 (0.008 -> 0.001, whose half 0.0005 is below; 0.0015 -> 0.00075;
    0.1 -> 0.1/64, as 0.1/128 < 1e-3)."""
    probes = _fake_search(monkeypatch, bracket, lambda z: 0.0)
    assert accountant._calibrate_by_bisection(1.0, DELTA, 0.1, 10, "pld") == expected
    assert probes[-1] == expected


@settings(max_examples=60, deadline=None)
@given(
    least=st.floats(min_value=0.01, max_value=50.0),
    looseness=st.floats(min_value=1.0, max_value=64.0),
    rtol=st.sampled_from([1e-3, 1e-2]),
)
def test_bisection_from_any_bracket_ends_within_its_tolerance_of_the_least_noise(
    least, looseness, rtol
) -> None:
    """From any bracket at or above the least z (RDP is looser than PLD, so its z is never
    below), the answer keeps the target and is within rtol of the least z: a bracket many times
    too loose, even with the least z below 1.001, is halved down, not returned."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _fake_search(monkeypatch, least * looseness, lambda z: least / z)
        z = accountant._calibrate_by_bisection(1.0, DELTA, 0.1, 10, "pld", rtol=rtol)
    assert least / z <= 1.0
    assert z <= least * (1 + rtol) * (1 + 1e-12)


def test_calibration_reproduces_the_committed_pipelines_noise() -> None:
    """The DP-SGD stage's committed metrics (metrics/finetune-dpsgd.json, written by
    `dvc repro`) record its plan and the noise it calibrated; calibrating that plan again gives
    the same float, so the published results reproduce bit for bit from the lock file. A change
    to the search that moves z, even within its tolerance, has to come with a `dvc repro`."""
    from pathlib import Path

    metrics = json.loads(
        (Path(__file__).resolve().parents[1] / "metrics" / "finetune-dpsgd.json").read_text()
    )
    assert metrics["accountant"] == "pld" and metrics["mechanism"] == "gaussian"
    z = accountant._calibrate_by_bisection(
        metrics["target_epsilon"], metrics["delta"], metrics["sample_rate"], metrics["steps"], "pld"
    )
    assert z == metrics["noise_multiplier"]


def test_the_lmo_shift_bound_of_a_fixed_scale_is_laplaces_rdp() -> None:
    """With the inverse scale (nearly) fixed at 1, the LMO bound at shift s is the Laplace
    mechanism's RDP at sensitivity s, scale 1 (Mironov 2017, Prop. 6), computed here by hand,
    and so is one unsubsampled step's; shift 0 spends nothing, a negative shift, an order <= 1
    and a sampling rate outside (0, 1] are refused."""
    from privtune.privacy.lmo_accounting import rdp_at_shift, rdp_per_step, subsampled_rdp
    from privtune.privacy.lmo_mechanism import LMOParams

    fixed = LMOParams(a1=1e-12, a3=1e-12, a4=1.0, k=1.0, theta=1.0, lam=1.0, a=1.0, b=1.0 + 1e-9)
    orders = [2, 3, 8]
    for shift in (0.5, 1.0, 2.0):
        laplace = [
            math.log(
                a / (2 * a - 1) * math.exp((a - 1) * shift)
                + (a - 1) / (2 * a - 1) * math.exp(-a * shift)
            )
            / (a - 1)
            for a in orders
        ]
        assert list(rdp_at_shift(fixed, orders, shift)) == pytest.approx(laplace, rel=1e-6)
        if shift == 1.0:  # one release of sensitivity 1 clip, the bound composition uses
            assert list(rdp_per_step(fixed, orders)) == pytest.approx(laplace, rel=1e-6)
    assert list(rdp_at_shift(fixed, orders, 0.0)) == pytest.approx([0.0] * 3, abs=1e-12)
    with pytest.raises(ValueError) as err:
        rdp_at_shift(fixed, orders, -0.1)
    assert str(err.value) == "shift must be >= 0 (the bound is symmetric)"
    # LAW's Gamma part (a1 = 0.1, theta = 0.5) has no MGF at t >= 20: order 8 at shift 3 asks
    # for t = 21, no bound (inf); order 2 asks for t = 3, finite
    low, high = rdp_at_shift(LAW, [2, 8], 3.0)
    assert math.isfinite(low) and high == math.inf
    with pytest.raises(ValueError) as err:
        rdp_per_step(fixed, [1, 2])
    assert str(err.value) == "Renyi orders must be > 1"
    for q in (0.0, 1.5):
        with pytest.raises(ValueError) as err:
            subsampled_rdp(rdp_per_step(fixed, orders), q)
        assert str(err.value) == f"sample_rate must be in (0, 1], got {q}"


def test_prv_falls_back_to_rdp_when_its_discretisation_fails(monkeypatch) -> None:
    """PRV can fail on extreme schedules; the answer is then RDP's (looser, always sound),
    here opacus' RDP accountant asked directly."""
    from opacus.accountants import RDPAccountant

    def fail(self, delta, **kwargs):
        raise RuntimeError("discretisation failed")

    monkeypatch.setattr(accountant.PRVAccountant, "get_epsilon", fail)
    rdp = RDPAccountant()
    rdp.history = [(1.0, 0.1, 3), (2.0, 0.2, 4)]
    expected = rdp.get_epsilon(DELTA)
    assert accountant.epsilon(rdp.history, DELTA, "prv") == pytest.approx(expected, rel=1e-12)


def test_a_calibration_opacus_leaves_short_is_raised_until_it_fits(monkeypatch) -> None:
    """Should opacus' calibration come back on the unsafe side, the re-check raises it in
    0.1 % steps: the result spends at most the target, and 0.1 % less would not."""
    q, steps, target = 0.05, 40, 2.0
    exact = accountant._calibrate(target, DELTA, q, steps, "rdp")
    monkeypatch.setattr(accountant, "get_noise_multiplier", lambda **kw: 0.97 * exact)
    sigma = accountant._calibrate(target, DELTA, q, steps, "rdp")
    assert accountant.epsilon([(sigma, q, steps)], DELTA, "rdp") <= target
    assert accountant.epsilon([(sigma / 1.001, q, steps)], DELTA, "rdp") > target
    assert sigma == pytest.approx(exact, rel=6e-3)


def test_a_calibration_that_spends_exactly_the_target_is_kept(monkeypatch) -> None:
    """opacus' answer is re-checked with "at most": a z spending exactly the target is not
    raised; the accountant is passed on (PRV's calibration is PRV's, not opacus' default
    RDP's, so it is tight under PRV)."""
    monkeypatch.setattr(accountant, "get_noise_multiplier", lambda **kw: 0.75)
    # a stand-in spend, 1.5 / z: exactly 2.0 at opacus' 0.75, less above it
    monkeypatch.setattr(accountant, "epsilon", lambda segments, delta, name: 1.5 / segments[0][0])
    assert accountant._calibrate(2.0, DELTA, 0.05, 40, "rdp") == 0.75
    monkeypatch.undo()
    sigma = accountant._calibrate(2.0, DELTA, 0.05, 40, "prv")
    assert accountant.epsilon([(sigma, 0.05, 40)], DELTA, "prv") <= 2.0
    assert accountant.epsilon([(sigma / 1.01, 0.05, 40)], DELTA, "prv") > 2.0


def test_a_cached_calibration_is_used_when_it_keeps_the_target_under_its_own_accountant(
    tmp_path, monkeypatch
) -> None:
    """The cache serves any z that spends at most the target under the accountant asked
    (a louder one costs utility, never privacy), PLD when none is named; a z that is safe
    under PLD but not under the looser RDP is not served to an RDP calibration."""
    import json

    monkeypatch.setenv("PRIVTUNE_CACHE_DIR", str(tmp_path))
    plan = (4.0, 1e-5, 0.02, 200)
    sigma = accountant.calibrate_noise(*plan)
    assert sigma == accountant.calibrate_noise(*plan, "pld")
    cache = tmp_path / "calibration.json"
    (key,) = json.loads(cache.read_text())
    louder = sigma * 1.05  # spends less than the target: safe, if not the least
    assert louder < 1.0
    cache.write_text(json.dumps({key: louder}))
    assert accountant.calibrate_noise(*plan) == louder

    rdp_sigma = accountant.calibrate_noise(*plan, "rdp")
    entries = json.loads(cache.read_text())
    (rdp_key,) = [k for k in entries if "'rdp'" in k]
    assert accountant.epsilon([(sigma, 0.02, 200)], 1e-5, "rdp") > 4.0  # PLD's z: not RDP-safe
    cache.write_text(json.dumps({**entries, rdp_key: sigma}))
    assert accountant.calibrate_noise(*plan, "rdp") == pytest.approx(rdp_sigma, rel=1e-9)

    # a cached z spending exactly the target (a stand-in accountant says so) is served
    monkeypatch.setattr(accountant, "epsilon", lambda segments, delta, name: 4.0)
    cache.write_text(json.dumps({key: louder}))
    assert accountant.calibrate_noise(*plan) == louder


def test_lmo_epsilon_of_several_candidates_is_each_ones_own() -> None:
    """The vectorised RDP -> epsilon conversion (the LMO search's) gives each candidate's row
    what opacus' conversion gives it alone; a row with no finite order has no guarantee."""
    import numpy as np
    from opacus.accountants.analysis.rdp import get_privacy_spent

    from privtune.privacy.lmo_accounting import rdp_to_epsilon_arrays

    orders = np.arange(2, 33)
    # a NaN order (inf RDP times 0 steps, say) is skipped, as opacus skips it, not taken as min
    gappy = np.where(orders < 8, np.nan, 0.03 * orders)
    rdp = np.stack([0.01 * orders, 0.2 * np.sqrt(orders), gappy, np.full(orders.shape, np.inf)])
    eps = rdp_to_epsilon_arrays(rdp, orders, DELTA)
    expected = [get_privacy_spent(orders=orders, rdp=row, delta=DELTA)[0] for row in rdp[:3]]
    assert eps.dtype == np.float64 and eps.shape == (4,) and eps[3] == math.inf
    assert list(eps[:3]) == pytest.approx(expected, rel=1e-9)
    assert rdp_to_epsilon_arrays(np.full((1, 3), np.nan), orders[:3], DELTA)[0] == math.inf


def test_a_norm_at_its_clip_counts_as_unclipped_and_a_hair_above_does_not() -> None:
    """b_i of the unclipped count is 1 when every group norm is within (<=) its threshold,
    decided at the norms' own precision: 1e-12 above a clip of 0.1 is above it, although
    float32 would round the clip up past it."""
    import torch

    from privtune.privacy.mechanisms.gaussian import Gaussian

    clip = 0.1
    norms = torch.tensor([[clip], [clip + 1e-12], [clip * (1 - 1e-12)]], dtype=torch.float64)
    mech = Gaussian([[torch.nn.Parameter(torch.zeros(1))]], ["a"], seed=0)
    released = mech.release_unclipped_count(norms, [clip], 1e-12, expected=3.0)
    assert released == pytest.approx((2 - 3 / 2) / 3.0 + 0.5, abs=1e-9)  # 2 of 3 unclipped
    # the histogram's levels too: ||g|| <= 0.3 * C, with 0.3 not rounded to float32 (0.3000001)
    norms = torch.tensor([[0.3], [0.3 + 1e-12], [0.3 * (1 - 1e-12)]], dtype=torch.float64)
    released = mech.release_norm_histogram(norms, [1.0], [0.3], 1e-12, expected=3.0)
    assert released.shape == (1, 1) and released[0, 0] == pytest.approx(2 / 3, abs=1e-9)


def test_lmo_epsilon_refuses_a_plan_outside_its_domain() -> None:
    """q in (0, 1], at least one step, delta in (0, 1): each edge on the right side of it, for
    the sound epsilon and for the paper's numbers alike (whose Gaussian proxy would otherwise
    take q = 0 or 1.5 without a word)."""
    from privtune.privacy.lmo_accounting import epsilon as lmo_epsilon
    from privtune.privacy.lmo_accounting import paper_epsilon

    for q, steps, delta, message in [
        (0.0, 1, DELTA, "sample_rate must be in (0, 1], got 0.0"),
        (1.5, 1, DELTA, "sample_rate must be in (0, 1], got 1.5"),
        (0.1, 0, DELTA, "steps must be >= 1, got 0"),
        (0.1, 1, 0.0, "delta must be in (0, 1), got 0.0"),
        (0.1, 1, 1.0, "delta must be in (0, 1), got 1.0"),
    ]:
        for computed in (lmo_epsilon, paper_epsilon):
            with pytest.raises(ValueError) as err:
                computed(LAW, q, steps, delta)
            assert str(err.value) == message
    assert 0 < lmo_epsilon(LAW, 1.0, 1, DELTA) < math.inf  # q = 1 and one step are allowed
    # a segment's RDP names the rate as it was given
    from privtune.privacy.lmo_accounting import segment_rdp

    for q in (0, 2, -0.5):
        with pytest.raises(ValueError) as err:
            segment_rdp(LAW, q, 10)
        assert str(err.value) == f"sample_rate must be in (0, 1], got {q}"
    # fewer Renyi orders can only loosen the bound: orders 2..16 give opacus' conversion of the
    # segment's RDP at exactly those orders
    from opacus.accountants.analysis.rdp import get_privacy_spent

    from privtune.privacy.lmo_accounting import orders_up_to

    few = lmo_epsilon(LAW, 0.1, 20, DELTA, max_order=16)
    by_hand, _ = get_privacy_spent(
        orders=orders_up_to(16), rdp=segment_rdp(LAW, 0.1, 20, max_order=16), delta=DELTA
    )
    assert few == pytest.approx(by_hand, rel=1e-12)
    assert few >= lmo_epsilon(LAW, 0.1, 20, DELTA)


def test_the_default_delta_of_a_plan_stays_under_the_registrys_gate() -> None:
    """A small corpus: 1/(10 N) = 1e-3 is above a delta gate of 1e-4, so the plan takes the
    gate's 1e-4 (a model that trains is not refused for its delta later)."""
    params = _finetune(batch_size=10, epochs=1.0)
    assert make_plan(100, params, private=False).delta == pytest.approx(1e-3)
    assert make_plan(100, params, private=False, max_delta=1e-4).delta == 1e-4


def test_subsampled_lmo_rdp_is_zhu_and_wangs_general_bound_by_hand() -> None:
    """Theorem 5 of Zhu & Wang (ICML 2019) written out at alpha = 2 and 3, q = 0.1: no factor 3
    on the l = 2 term, a factor 3 from l = 3 on; orders_up_to's ends."""
    from privtune.privacy.lmo_accounting import orders_up_to, subsampled_rdp

    q, e2, e3 = 0.1, 2.0, 3.0  # base RDP at orders 2 and 3, large enough not to be the min
    at2 = math.log((1 - q) * (1 + q) + q**2 * math.exp(e2))
    at3 = (
        math.log(
            (1 - q) ** 2 * (1 + 2 * q)
            + 3 * q**2 * (1 - q) * math.exp(e2)
            + 3 * q**3 * math.exp(2 * e3)
        )
        / 2
    )
    assert list(subsampled_rdp([e2, e3], q)) == pytest.approx([at2, at3], rel=1e-12)
    assert list(subsampled_rdp([2, 3], q)) == pytest.approx([at2, at3], rel=1e-12)  # ints
    # vectorised over candidates: each row of a (N, A) base is that row's own bound
    import numpy as np

    rows = np.array([[e2, e3, 4.0], [0.5, 0.7, 0.9], [np.inf, 1.0, 2.0]])
    each = np.stack([subsampled_rdp(row, q) for row in rows])
    np.testing.assert_allclose(subsampled_rdp(rows, q), each, rtol=1e-12)
    assert subsampled_rdp(rows, q).shape == (3, 3)
    assert list(orders_up_to(2)) == [2] and list(orders_up_to(4)) == [2, 3, 4]
    with pytest.raises(ValueError) as err:
        orders_up_to(1)
    assert str(err.value) == "max_order must be >= 2"


def test_the_step_pld_inverts_the_loss_in_one_pass_not_the_librarys_loop(monkeypatch) -> None:
    """gaussian_step_pld's losses answer the library's array queries themselves (the point
    of the module: the library's loop costs 0.1 s a step PLD, built dozens of times a run),
    and the PLD is the library's to rounding."""
    import numpy as np
    from dp_accounting.pld import privacy_loss_distribution as pld
    from dp_accounting.pld import privacy_loss_mechanism as plm

    from privtune.privacy.pld_gaussian import gaussian_step_pld

    library = pld.from_gaussian_mechanism(
        standard_deviation=0.9,
        sampling_prob=0.05,
        value_discretization_interval=accountant.PLD_INTERVAL,
        pessimistic_estimate=True,
    )
    slow = plm.GaussianPrivacyLoss.get_delta_for_epsilon
    asked: list[int] = []

    def spy(self, epsilon):
        asked.append(int(np.ndim(epsilon)))
        return slow(self, epsilon)

    monkeypatch.setattr(plm.GaussianPrivacyLoss, "get_delta_for_epsilon", spy)
    fast = gaussian_step_pld(0.9, 0.05, accountant.PLD_INTERVAL)
    assert asked == []
    for delta in (1e-3, 1e-6):
        assert fast.get_epsilon_for_delta(delta) == pytest.approx(
            library.get_epsilon_for_delta(delta), rel=1e-12
        )
    # the truncated tail (mass ~1e-25) counted pessimistically, as an infinite loss
    assert fast.get_delta_for_epsilon(50.0) == pytest.approx(
        library.get_delta_for_epsilon(50.0), rel=1e-9
    )
    assert fast.get_delta_for_epsilon(50.0) > 0
    # each adjacency's own PMF (the REMOVE side dominates the max; the ADD side is its own)
    for side in ("_pmf_add", "_pmf_remove"):
        assert getattr(fast, side).get_delta_for_epsilon(0.2) == pytest.approx(
            getattr(library, side).get_delta_for_epsilon(0.2), rel=1e-9, abs=1e-300
        )


@pytest.mark.parametrize("adjacency", ["ADD", "REMOVE"])
def test_the_vectorised_loss_is_the_librarys_at_any_sensitivity_and_at_its_bound(adjacency):
    """Deltas of the subsampled Gaussian loss (sensitivity 2, q = 0.05) against the library's,
    at epsilons on both sides of the loss's bound log(1 - q) (REMOVE) or -log(1 - q) (ADD),
    exactly at it, a hair inside it and as integers; one epsilon, or a step
    without subsampling (q = 1, where the closed form's constant 1 - 1/q is 0), is the
    library's own answer, a float."""
    import numpy as np
    from dp_accounting.pld import privacy_loss_mechanism as plm

    from privtune.privacy.pld_gaussian import VectorisedGaussianLoss

    kind = plm.AdjacencyType[adjacency]

    def both(q: float):
        kwargs = dict(sensitivity=2.0, pessimistic_estimate=True, sampling_prob=q)
        return (
            VectorisedGaussianLoss(0.9, adjacency_type=kind, **kwargs),
            plm.GaussianPrivacyLoss(0.9, adjacency_type=kind, **kwargs),
        )

    q = 0.05
    ours, theirs = both(q)
    bound = -math.log1p(-q) if adjacency == "ADD" else math.log1p(-q)
    # inside the bound by 1e-7 (the closed form) and by 1e-10 (within the library's isclose:
    # the inverse's limit), at it, and beyond it
    near = [bound * (1 - 1e-7), bound * (1 - 1e-10), bound, bound * 1.5, 0.5 * bound]
    grid = np.array([-0.2, 0.0, 0.01, 0.5, 2.0, *near])
    np.testing.assert_allclose(
        ours.get_delta_for_epsilon(grid), theirs.get_delta_for_epsilon(grid), rtol=1e-9
    )
    at_bound = ours.get_delta_for_epsilon(np.array([bound]))
    assert at_bound[0] == theirs.get_delta_for_epsilon(np.array([bound]))[0]  # q or 0, exactly
    integers = ours.get_delta_for_epsilon([0, 1, 2])
    np.testing.assert_allclose(integers, theirs.get_delta_for_epsilon([0.0, 1.0, 2.0]), rtol=1e-9)
    one = ours.get_delta_for_epsilon(0.5)
    assert isinstance(one, float) and one == theirs.get_delta_for_epsilon(0.5)
    ours, theirs = both(1.0)
    np.testing.assert_array_equal(
        ours.get_delta_for_epsilon(grid), theirs.get_delta_for_epsilon(grid)
    )


def test_log_a_exp_b_plus_c_is_the_librarys_and_quiet_at_the_edge_of_its_domain() -> None:
    """log(a e^b + c) for a > 0 > c as dp-accounting's common.log_a_times_exp_b_plus_c gives
    it (exactly its log(a + c) at b = 0); where a e^b + c reaches 0 (the loss's bound, which
    the caller replaces) it is -inf, and below it NaN, without a floating-point error even
    where numpy is set to raise."""
    import numpy as np
    from dp_accounting.pld import common

    from privtune.privacy.pld_gaussian import _log_a_exp_b_plus_c

    q = 0.05  # the subsampled loss's constants: a = 1/q, c = 1 - 1/q, so log(a + c) = 0
    a, c = 1 / q, 1 - 1 / q
    bs = np.array([0.0, 0.3, 2.0, -0.01])
    ours = _log_a_exp_b_plus_c(a, bs, c)
    assert ours[0] == common.log_a_times_exp_b_plus_c(a, 0.0, c) == 0.0  # not 8.9e-16
    np.testing.assert_allclose(
        ours[1:], [common.log_a_times_exp_b_plus_c(a, b, c) for b in bs[1:]], rtol=1e-12
    )
    a, c = 2.0, -1.0
    edge = math.log(0.5)  # 2 e^b - 1 = 0
    with np.errstate(all="raise"):
        at_edge, below = _log_a_exp_b_plus_c(a, np.array([edge, edge - 0.1]), c)
    assert at_edge == -math.inf and math.isnan(below)


def test_without_the_library_internals_the_step_pld_is_the_librarys_own(monkeypatch) -> None:
    """Should a dp-accounting release drop the private helpers the fast path borrows, or for a
    step without subsampling, the step PLD is pld.from_gaussian_mechanism's, pessimistic, at
    the accountant's discretisation: the same epsilons to the last bit."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    from privtune.privacy import pld_gaussian

    def library(q: float):
        return pld.from_gaussian_mechanism(
            standard_deviation=0.9,
            sampling_prob=q,
            value_discretization_interval=accountant.PLD_INTERVAL,
            pessimistic_estimate=True,
        )

    def same(built, expected) -> None:
        for delta in (1e-3, 1e-6):
            assert built.get_epsilon_for_delta(delta) == expected.get_epsilon_for_delta(delta)

    same(pld_gaussian.gaussian_step_pld(0.9, 1.0, accountant.PLD_INTERVAL), library(1.0))
    for helper in ("_build_pmf", "_for_subsampled"):
        with monkeypatch.context() as patched:
            patched.setattr(pld_gaussian, helper, None)
            built = pld_gaussian.gaussian_step_pld(0.9, 0.05, accountant.PLD_INTERVAL)
        same(built, library(0.05))


def _guard_with_projection(spend, target: float = 1.0) -> BudgetGuard:
    """A guard whose projection is a stand-in, so its raise search is checked by hand."""
    guard = BudgetGuard(
        ledger=PrivacyLedger(), target_epsilon=target, delta=DELTA, sample_rate=0.05,
        total_steps=60, reserve_noise=1.0,
    )  # fmt: skip
    guard.projected = lambda z, steps: spend(z)
    return guard


def test_the_raise_accepts_a_noise_that_spends_exactly_the_target() -> None:
    """Asked for z = 1 (spend 2, target 1), the search's first widening probes z = e^(log 2),
    where the spend is exactly the target: "at most" admits it, and nothing below it fits, so
    that z is the answer, with the target as its projection."""
    first = math.exp(math.log(2.0))  # low + min(f(low), log 64) with f(low) = log 2
    guard = _guard_with_projection(lambda z: 1.0 if z >= first else 2.0)
    admission = guard.admit(1.0, 5)
    assert admission.raised and admission.noise_multiplier == first
    assert admission.projected_epsilon == 1.0
    # a request that spends exactly the target is admitted as asked, not raised
    admission = _guard_with_projection(lambda z: 1.0).admit(0.7, 5)
    assert not admission.raised and admission.noise_multiplier == 0.7


def test_the_raise_treats_a_projection_of_zero_as_fitting() -> None:
    """So much noise that the PLD spends nothing (epsilon 0 at this delta) fits the budget
    (log 0 is -inf, not an error, not an overspend); the least noise that fits, 16 here
    (spend 4 / sqrt(z) below z = 20, nothing above; the widening probes z = 4, then 64), is
    still found to rtol."""
    probed: list[float] = []
    guard = _guard_with_projection(lambda z: probed.append(z) or (0.0 if z >= 20 else 4 / z**0.5))
    admission = guard.admit(1.0, 5)
    assert any(z >= 20 for z in probed)  # the search did meet a projection of 0
    assert admission.raised and admission.projected_epsilon <= 1.0
    assert 16 <= admission.noise_multiplier <= 16 * (1 + 1e-3)  # the default rtol, 0.1 %


def test_the_per_step_check_names_why_it_refuses_and_its_slack_is_inclusive() -> None:
    """The step check's two refusals say which rule a step broke; a noise exactly at the
    admitted z less its 1e-9 rounding slack still passes."""
    guard = BudgetGuard(
        ledger=PrivacyLedger(), target_epsilon=2.0, delta=DELTA, sample_rate=0.05,
        total_steps=10, reserve_noise=3.0, accountant="rdp",
    )  # fmt: skip
    with pytest.raises(BudgetExhausted) as err:
        guard.check_step(5.0)
    assert str(err.value) == "step not admitted: call admit() for the next interval"
    z = guard.admit(4.0, 3).noise_multiplier
    guard.check_step(z * (1 - 1e-9))
    with pytest.raises(BudgetExhausted) as err:
        guard.check_step(z * (1 - 1e-6))
    assert str(err.value) == "step noise is below the admitted noise multiplier"


def test_the_ledger_names_the_mechanisms_it_knows() -> None:
    entry = LedgerEntry(
        step=0, sample_rate=0.1, noise_multiplier=1.0, clip_thresholds=(1.0,),
        noise_stds=(1.0,), batch_size=4,
    )  # fmt: skip
    with pytest.raises(ValueError) as err:
        PrivacyLedger().record(dataclasses.replace(entry, mechanism="laplace"))
    assert str(err.value) == "unknown noise mechanism 'laplace': use one of gaussian, lmo"


def test_the_raise_closes_a_gap_the_root_finder_leaves_by_bisection(monkeypatch) -> None:
    """Should Brent's method come back with a poor root (here: the bracket's midpoint, at
    once), the search still ends at the least noise to 0.1 %, by bisecting what is left."""
    from privtune.privacy import guard as guard_module

    monkeypatch.setattr(guard_module.optimize, "brentq", lambda f, a, b, xtol: (a + b) / 2)
    guard = _guard_with_projection(lambda z: 10.0 / z)  # the least z that fits: 10
    admission = guard.admit(1.0, 5)
    assert admission.raised and admission.projected_epsilon <= 1.0
    assert 10 <= admission.noise_multiplier <= 10 * (1 + 1e-3)


def test_the_guard_names_what_it_refuses() -> None:
    """A reserve without noise, and an admission past the planned steps, say so."""
    with pytest.raises(ValueError) as err:
        BudgetGuard(
            ledger=PrivacyLedger(), target_epsilon=1.0, delta=DELTA, sample_rate=0.05,
            total_steps=4, reserve_noise=0.0,
        )  # fmt: skip
    assert str(err.value) == "reserve_noise must be > 0"
    guard = _guard_with_projection(lambda z: 0.5)
    guard.total_steps = 0
    with pytest.raises(BudgetExhausted) as err:
        guard.admit(1.0, 1)
    assert str(err.value) == "the planned number of steps has been taken"


def test_prv_and_pld_take_over_from_rdp_at_exactly_their_least_noise() -> None:
    """PLD and PRV answer for every segment at z >= PRV_MIN_NOISE (0.1) and are tighter than
    RDP there: at z = 0.1 exactly they are theirs, not RDP's fallback."""
    schedule = [(accountant.PRV_MIN_NOISE, 0.01, 5)]
    rdp = accountant.epsilon(schedule, DELTA, "rdp")
    for name in ("pld", "prv"):
        assert accountant.epsilon(schedule, DELTA, name) < 0.9 * rdp


def test_a_mixed_ledger_counts_every_lmo_step_and_every_gaussian_segment() -> None:
    """One LMO step is one step more spending than none; a Gaussian segment of no steps (even
    at z = 0) is skipped, not a reason to stop reading the schedule or to call it unbounded."""
    from privtune.privacy.accountant import composed_epsilon

    gaussian = [(1.0, 0.05, 50)]
    without = composed_epsilon(gaussian, [(LAW, 0.05, 10)], DELTA)
    one_more = composed_epsilon(gaussian, [(LAW, 0.05, 10), (LAW, 0.05, 1)], DELTA)
    assert one_more > without
    assert composed_epsilon(gaussian, [(LAW, 0.05, 1)], DELTA) > composed_epsilon(
        gaussian, [(LAW, 0.05, 0)], DELTA
    )
    padded = [(0.0, 0.05, 0), (2.0, 0.05, 0), *gaussian]
    assert composed_epsilon(padded, [(LAW, 0.05, 10)], DELTA) == without


# -- the guard's raise search, probe by probe ---------------------------------------------------
#
# The search's contract is "the least noise that fits, to rtol, from few projections". The
# tests above check the first half on real accountants; these check how it gets there, on
# stand-in projections whose least fitting noise is known by hand, by recording every noise
# the guard projects and every call to the root finder.

# rtol whose tolerance log(1 + rtol) is a multiple of 2^-53, so that brackets of exactly
# "tol" can be built in floats below 1 (the search's "within tol" is inclusive there)
EXACT_RTOL = 0.0010000000000423004
EXACT_TOL = math.log(1 + EXACT_RTOL)


def _search(spend, request: float, *, rtol: float = 1e-3, max_noise: float = 1e3, root=None):
    """Admit `request` under a stand-in projection `spend(z)` (target 1); `root(f, a, b)`, if
    given, replaces Brent's method. Returns the admission, the noises the search projected in
    order (after admit's own projection of the request) and the root finder's calls
    (a, b, xtol, f(a), f(b))."""
    from privtune.privacy import guard as guard_module

    probed: list[float] = []
    calls: list[tuple[float, float, float, float, float]] = []
    guard = _guard_with_projection(lambda z: probed.append(z) or spend(z))
    guard.rtol, guard.max_noise = rtol, max_noise
    brentq = guard_module.optimize.brentq

    def finder(f, a, b, xtol):
        calls.append((a, b, xtol, f(a), f(b)))
        return root(f, a, b) if root else brentq(f, a, b, xtol=xtol)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(guard_module.optimize, "brentq", finder)
        admission = guard.admit(request, 5)
    assert probed[0] == request
    return admission, probed[1:], calls


def test_the_search_widens_by_the_requests_overspend_capped_at_64_then_doubles() -> None:
    """Spend 1e6 / z from z = 1: the first step along eps ~ 1/z would be 1e6, capped at 64;
    the steps then double in log z (64^3, then 64^7, beyond the ceiling of 1e9, so the
    ceiling), and Brent's method starts from the last two, at a quarter of the tolerance."""
    admission, probed, calls = _search(lambda z: 1e6 / z, 1.0, max_noise=1e9)
    assert probed[:3] == pytest.approx([64.0, 64.0**3, 1e9], rel=1e-12)
    (a, b, xtol, _, _) = calls[0]
    assert (math.exp(a), math.exp(b)) == pytest.approx((64.0**3, 1e9), rel=1e-12)
    assert xtol == math.log(1 + 1e-3) / 4
    assert 1e6 <= admission.noise_multiplier <= 1e6 * (1 + 1e-3)


def test_the_root_finder_sees_the_log_overspend_clamped_to_50() -> None:
    """A projection e^69 times the target and one of 0 (log -inf) reach Brent's method as
    +50 and -50: finite, so its interpolation stays defined; the least noise, 100, is found."""
    admission, _, calls = _search(lambda z: 1e30 if z < 100 else 0.0, 1.0)
    [(a, b, _, fa, fb)] = calls
    assert (math.exp(a), math.exp(b)) == pytest.approx((64.0, 1e3), rel=1e-12)
    assert (fa, fb) == (50.0, -50.0)
    assert 100 <= admission.noise_multiplier <= 100 * (1 + 1e-3)


def test_a_widening_step_of_exactly_tol_needs_no_root_finder() -> None:
    """From z = 2.5, an overspend of 1e-5 in log asks for a step below the tolerance; the step
    is the tolerance, which fits, and a bracket of exactly tol is precise enough: one
    projection, no root finding, no bisection."""
    low = math.log(2.5)
    assert (low + EXACT_TOL) - low == EXACT_TOL  # the bracket is exactly tol in floats
    admission, probed, calls = _search(lambda z: 2.5 * math.exp(1e-5) / z, 2.5, rtol=EXACT_RTOL)
    assert probed == [math.exp(low + EXACT_TOL)] and calls == []
    assert admission.noise_multiplier == math.exp(low + EXACT_TOL)


def test_the_search_probes_a_quarter_tol_either_side_of_the_root() -> None:
    """Spend 5 / z^2 from z = 1: the widening's first probe, z = 5, fits; the root is at
    z = sqrt(5). Brent's method (here: answering the exact root without projecting) is
    followed by one probe a quarter of the tolerance above it (fits) and one below (does
    not): a bracket of tol / 2, so the answer is the probe above."""
    root = math.log(5) / 2
    tol = math.log(1 + 1e-3)
    admission, probed, calls = _search(lambda z: 5 / z**2, 1.0, root=lambda f, a, b: root)
    assert len(calls) == 1
    assert probed == [math.exp(math.log(5.0)), math.exp(root + tol / 4), math.exp(root - tol / 4)]
    assert admission.noise_multiplier == math.exp(root + tol / 4)


def test_the_second_probe_is_skipped_once_the_bracket_is_within_tol() -> None:
    """As above, but the root finder had already projected 3/4 tol below the root: after the
    probe above the root the bracket is exactly tol, so the probe below is not needed."""
    root = math.log(5) / 2
    below = (root + EXACT_TOL / 4) - EXACT_TOL
    assert (root + EXACT_TOL / 4) - below == EXACT_TOL  # exactly tol in floats

    def finder(f, a, b):
        f(below)
        return root

    admission, probed, _ = _search(lambda z: 5 / z**2, 1.0, rtol=EXACT_RTOL, root=finder)
    assert probed == [math.exp(math.log(5.0)), math.exp(below), math.exp(root + EXACT_TOL / 4)]
    assert admission.noise_multiplier == math.exp(root + EXACT_TOL / 4)


def test_a_stretch_spending_exactly_the_target_is_searched_down_to_its_start() -> None:
    """Spend 2 below z = 1.5, exactly the target from 1.5 to 3, 0.5 above: every noise from
    1.5 on fits ("at most" the target), so the least is 1.5, although Brent's method stops at
    the first zero it meets (z = 2); the bisection counts a midpoint spending exactly the
    target as fitting, and a bracket end there as feasible, not as the infeasible side."""
    admission, probed, _ = _search(lambda z: 2.0 if z < 1.5 else 1.0 if z < 3 else 0.5, 1.0)
    assert probed[0] == 2.0  # the widening's first probe: exactly the target
    assert 1.5 <= admission.noise_multiplier <= 1.5 * (1 + 1e-3)
    assert admission.projected_epsilon == 1.0
