"""White-box one-run audit: Dirac gradient canaries are records of the one loop (sampled,
clipped, noised, accounted), and their scores bound epsilon from below: clearly positive for a
non-private run, at or below the claim for DP runs, above it when the noise is secretly cut."""

import numpy as np
import pytest
import torch

from privtune.attacks.audit import one_run_audit
from privtune.config import FinetuneParams, LoraParams
from privtune.data.tokenization import encode_records
from privtune.modeling import attach_lora
from privtune.privacy import mechanisms
from privtune.privacy.action import Action
from privtune.privacy.gradient_canaries import (
    CanaryInjector,
    GradientCanaries,
    included_count,
)
from privtune.train import make_plan, planned_records, train
from tests.conftest import synthetic_texts

M = 200
PARAMS = FinetuneParams(
    secret_noise=False,  # these tests compare runs: reproducible seeds
    epsilon=1.0,
    batch_size=16,
    epochs=4.0,
    lr=5e-3,
    log_every=5,
    eval_every=50,
    eval_records=8,
    audit_canaries=M,
    lora=LoraParams(r=4),
)


def _data(tokenizer):
    return (
        encode_records(synthetic_texts(160, seed=1), tokenizer, 64),
        encode_records(synthetic_texts(16, seed=2), tokenizer, 64),
    )


def _audit(result):
    canaries = result.audit
    return one_run_audit(canaries.scores, canaries.included, delta=result.plan.delta)


def test_draw_is_deterministic_distinct_and_counts_its_records():
    a = GradientCanaries.draw(300, 5000, seed=3, norm=10.0)
    assert a.state_dict() == GradientCanaries.draw(300, 5000, seed=3, norm=10.0).state_dict()
    assert len(set(a.coordinates.tolist())) == 300 and a.coordinates.max() < 5000
    assert set(a.signs.tolist()) == {-1.0, 1.0}
    # the coins do not depend on the model: N is known before the model is built
    b = GradientCanaries.draw(300, 9000, seed=3, norm=1.0)
    assert (a.included == b.included).all() and a.n_included == included_count(300, 3)
    assert abs(a.n_included - 150) < 4 * np.sqrt(75)
    with pytest.raises(ValueError, match="audit_canaries"):
        GradientCanaries.draw(10, 5, seed=0, norm=1.0)


def test_round_trip_and_malformed_file(tmp_path):
    a = GradientCanaries.draw(20, 100, seed=1, norm=2.0)
    a.scores += np.arange(20)
    a.save(tmp_path / "audit.json")
    b = GradientCanaries.load(tmp_path / "audit.json")
    assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError, match="malformed"):
        GradientCanaries.from_state_dict({"norm": 1.0})


def test_injected_rows_are_dirac_gradients_on_their_coordinates():
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    canaries = GradientCanaries([2, 13, 16], [1.0, -1.0, 1.0], [True, True, False], norm=7.0)
    injector = CanaryInjector(canaries, params)
    for p in params:
        p.grad_sample = torch.ones(2, *p.shape)  # two real records
    rows = injector.rows(np.array([1, 0]))  # (2, 17): one row per canary
    expected = torch.zeros(2, 17)
    expected[0, 13], expected[1, 2] = -7.0, 7.0
    torch.testing.assert_close(rows, expected)
    assert injector.rows(np.array([], dtype=np.int64)).shape == (0, 17)
    # the mechanism takes them as extra records after the two real ones
    mech = mechanisms.Gaussian([params], ["all"], seed=0)
    spec = mech.admit(Action((100.0,), 1e-12), 1e-12)
    mech.accumulate(spec, rows)
    stats = mech.release(spec, 1.0, 4)
    assert stats.norms[:, 0].tolist() == pytest.approx([17**0.5, 17**0.5, 7.0, 7.0])
    # the released gradient is read back at every canary's coordinate, times its sign
    params[0].grad = torch.arange(12.0).view(3, 4)
    params[1].grad = torch.arange(5.0)
    injector.observe()
    assert canaries.scores.tolist() == [2.0, -1.0, 4.0]


def test_plan_counts_the_in_canaries_as_records(tiny_tokenizer):
    train_data, _ = _data(tiny_tokenizer)
    n = planned_records(len(train_data), PARAMS)
    assert n == 160 + included_count(M, PARAMS.seed)
    plan = make_plan(n, PARAMS, private=True)
    assert plan.sample_rate == pytest.approx(16 / n) and plan.delta < 1 / n


def test_nonprivate_run_is_audited_clearly_positive(tiny_model, tiny_tokenizer):
    train_data, valid_data = _data(tiny_tokenizer)
    model = attach_lora(tiny_model, PARAMS.lora)
    result = train(model, train_data, valid_data, PARAMS, "nonprivate", show_progress=False)
    audit = _audit(result)
    # Sampled canaries stand out of the released gradient; the few errors are IN canaries the
    # Poisson sampler never drew (probability e^-epochs each), which look OUT.
    assert audit.correct >= audit.guesses - 0.05 * M
    assert audit.epsilon_lower_bound > 2.0


@pytest.mark.parametrize("method", ["dpsgd", "per_adapter", "lmo"])
def test_dp_run_is_audited_at_or_below_its_claim(tiny_model, tiny_tokenizer, method):
    train_data, valid_data = _data(tiny_tokenizer)
    model = attach_lora(tiny_model, PARAMS.lora)
    result = train(model, train_data, valid_data, PARAMS, method, show_progress=False)
    assert result.epsilon <= PARAMS.epsilon
    assert _audit(result).epsilon_lower_bound <= result.epsilon


def test_audit_catches_noise_cut_behind_the_ledgers_back(tiny_model, tiny_tokenizer, monkeypatch):
    """A bug that adds 100x less noise than the ledger records must fail the audit."""
    add_noise = mechanisms.Gaussian.add_noise

    def too_little(self, total, stds):
        add_noise(self, total, [s / 100 for s in stds])

    monkeypatch.setattr(mechanisms.Gaussian, "add_noise", too_little)
    train_data, valid_data = _data(tiny_tokenizer)
    model = attach_lora(tiny_model, PARAMS.lora)
    result = train(model, train_data, valid_data, PARAMS, "dpsgd", show_progress=False)
    assert result.epsilon <= PARAMS.epsilon  # the ledger believes the run is private...
    assert _audit(result).epsilon_lower_bound > PARAMS.epsilon  # ...the audit does not
