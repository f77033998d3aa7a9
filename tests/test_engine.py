"""The privacy engine: the only way a step touches noise, and nothing in it can be skipped."""

from __future__ import annotations

import pytest
import torch

from privtune.errors import BudgetExhausted
from privtune.privacy.action import Action
from privtune.privacy.engine import PrivacyEngine
from privtune.privacy.mechanisms import Gaussian, NoNoise
from privtune.privacy.plan import TrainingPlan

PLAN = TrainingPlan(n_records=100, sample_rate=0.1, steps=6, delta=1e-5, calibrated_noise=1.2)


def _engine(mechanism_class=Gaussian, seed=3, plan=PLAN):
    p = torch.nn.Parameter(torch.zeros(4))
    return PrivacyEngine(
        plan=plan,
        mechanism=mechanism_class([[p]], ["p"], seed),
        target_epsilon=8.0,
        accountant="rdp",
    ), p


def _step(engine, p, step, rows=2):
    p.grad_sample = torch.ones(rows, 4)
    engine.accumulate()
    return engine.step(step, rows)


def test_no_step_without_an_admitted_action():
    engine, p = _engine()
    with pytest.raises(BudgetExhausted, match="decide"):
        _step(engine, p, 0)


def test_a_step_releases_noise_records_the_ledger_and_calls_the_hooks():
    engine, p = _engine()
    seen = []
    engine.attach_release_hook(lambda: seen.append(p.grad.clone()))
    action = engine.decide(Action((1.0,), 1.2), steps=2, reserve=1.2)
    assert action.noise_multiplier == pytest.approx(1.2)
    stats = _step(engine, p, 0)
    entry = engine.ledger.entries[0]
    assert (entry.step, entry.sample_rate, entry.batch_size) == (0, 0.1, 2)
    assert entry.noise_multiplier == pytest.approx(1.2) and entry.clip_thresholds == (1.0,)
    # two clipped unit-norm rows of ones/2, summed, noised, over the expected batch of 10
    assert len(seen) == 1 and torch.equal(seen[0], p.grad)
    assert not torch.allclose(p.grad, torch.full((4,), 2 * 0.5 / 10))  # noise was added
    assert stats.metrics["noise_multiplier"] == entry.noise_multiplier
    assert engine.spent() > 0 and engine.step_metrics(stats)["epsilon"] == engine.spent()


def test_steps_beyond_the_admitted_interval_are_refused():
    engine, p = _engine()
    engine.decide(Action((1.0,), 1.2), steps=1, reserve=1.2)
    _step(engine, p, 0)
    with pytest.raises(BudgetExhausted, match="not admitted"):
        _step(engine, p, 1)
    assert len(engine.ledger) == 1  # the refused step released and recorded nothing


def test_the_guard_raises_a_greedy_proposal_and_finish_holds_the_target():
    engine, p = _engine()
    step = 0
    while step < PLAN.steps:
        action = engine.decide(Action((1.0,), 0.05), steps=2, reserve=1.2)
        assert action.noise_multiplier > 0.05
        for _ in range(2):
            _step(engine, p, step)
            step += 1
    spent = engine.finish()
    assert spent.epsilon <= 8.0 and spent.accountant == "rdp"
    assert spent.metrics["mechanism"] == "gaussian" and spent.metrics["epsilon"] == spent.epsilon
    assert spent.epsilon_rdp == pytest.approx(spent.epsilon)  # the run's accountant is RDP here


def test_a_non_private_engine_has_no_ledger_and_spends_nothing():
    engine, p = _engine(NoNoise)
    engine.decide(Action((), 0.0), steps=6, reserve=0.0)
    p.grad = torch.ones(4)
    stats = engine.step(0, 3)
    torch.testing.assert_close(p.grad, torch.full((4,), 0.1))  # the sum over q N = 10
    assert engine.ledger is None and engine.spent() == 0.0 and engine.finish() is None
    assert engine.step_metrics(stats) == {}
    assert engine.step(1, 0) is None  # an empty batch: nothing released


def test_state_dict_resumes_the_same_noise_and_budget():
    """A resumed engine continues the ledger, the admitted interval and the noise stream."""
    engine, p = _engine()
    engine.decide(Action((1.0,), 1.2), steps=6, reserve=1.2)
    for step in range(3):
        _step(engine, p, step)
    state = engine.state_dict()
    _step(engine, p, 3)
    expected, ledger = p.grad.clone(), engine.ledger.state_dict()

    resumed, q = _engine(seed=99)  # a different seed: the state must override it
    resumed.load_state_dict(state)
    resumed.decide(Action((1.0,), 1.2), steps=3, reserve=1.2)
    _step(resumed, q, 3)
    torch.testing.assert_close(q.grad, expected)
    assert resumed.ledger.state_dict() == ledger
