"""Utility metrics: cached candidate scoring equals the plain computation; accuracy counts."""

import math
from types import SimpleNamespace

import pytest
import torch

from privtune.data.tokenization import encode_records
from privtune.evaluate import (
    continuation_logprobs,
    continuation_logprobs_uncached,
    medication_accuracy,
    perplexity,
)
from tests.conftest import synthetic_texts


def test_cached_scoring_matches_uncached(tiny_model, tiny_tokenizer):
    tiny_model.eval()
    candidates = ["metformin", "lisinopril", "salbutamol", "plan follow up"]
    prompt = "patient presents with cough fever plan start "
    cached = continuation_logprobs(tiny_model, tiny_tokenizer, prompt, candidates)
    plain = continuation_logprobs_uncached(tiny_model, tiny_tokenizer, prompt, candidates)
    torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-4)


class EarlierCacheNames(torch.nn.Module):
    """A model as transformers 5.1x (the GPU machines' 5.17) returns it: the key/value cache
    is `past_key_values`, in the output and as the argument, not `cache`."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, past_key_values=None, **kwargs):
        assert "cache" not in kwargs
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        out = self.model(**kwargs)
        return SimpleNamespace(logits=out.logits, past_key_values=out.cache)


def test_cached_scoring_runs_on_either_name_of_the_cache(tiny_model, tiny_tokenizer):
    tiny_model.eval()
    candidates = ["metformin", "lisinopril", "plan follow up"]
    prompt = "patient presents with cough fever plan start "
    current = continuation_logprobs(tiny_model, tiny_tokenizer, prompt, candidates)
    earlier = continuation_logprobs(
        EarlierCacheNames(tiny_model), tiny_tokenizer, prompt, candidates
    )
    torch.testing.assert_close(earlier, current)


def test_perplexity_of_uniform_model_is_vocab_size(tiny_tokenizer):
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            logits = torch.zeros(*input_ids.shape, 50) + self.w
            return type("Out", (), {"logits": logits})

    data = encode_records(synthetic_texts(4), tiny_tokenizer, 32)
    data.input_ids.clamp_(max=49)
    assert perplexity(Uniform(), data) == pytest.approx(50, rel=1e-5)


def test_medication_accuracy_counts_consistent_choices(monkeypatch):
    scores = {"a": torch.tensor([0.0, 1.0, -1.0]), "b": torch.tensor([2.0, 0.0, 0.0])}
    monkeypatch.setattr(
        "privtune.evaluate.continuation_logprobs", lambda m, t, prompt, c: scores[prompt]
    )
    records = [
        {"med_prompt": "a", "icd10": "X", "medication": "m2"},  # picks m2: consistent, exact
        {"med_prompt": "b", "icd10": "Y", "medication": "m3"},  # picks m1: inconsistent
    ]
    allowed = {"X": ["m2", "m3"], "Y": ["m3"]}
    result = medication_accuracy(None, None, records, ["m1", "m2", "m3"], allowed)
    assert result["medication_accuracy"] == 0.5
    assert result["medication_exact_match"] == 0.5
    assert math.isclose(result["medication_chance"], (2 + 1) / (2 * 3))


def test_evaluated_on_changes_with_what_the_numbers_were_measured_on():
    """The promotion's utility gate compares two versions only when this matches."""
    from types import SimpleNamespace

    from privtune.config import Params
    from privtune.stages.evaluate import evaluated_on

    params = Params()
    words = SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1})
    test = [{"text": "note one"}, {"text": "note two"}]
    same = evaluated_on(test, words, 64, params)
    assert same == evaluated_on([dict(r) for r in test], words, 64, params)
    batch = params.model_copy(
        update={"evaluate": params.evaluate.model_copy(update={"batch_size": 7})}
    )
    assert evaluated_on(test, words, 64, batch) == same  # the batch size changes no number
    other_task = params.model_copy(
        update={"evaluate": params.evaluate.model_copy(update={"task": None})}
    )
    others = [
        evaluated_on(test[:1], words, 64, params),
        evaluated_on(test, SimpleNamespace(get_vocab=lambda: {"a": 1, "b": 0}), 64, params),
        evaluated_on(test, words, 128, params),
        evaluated_on(test, words, 64, other_task),
        evaluated_on(test, words, 64, params, candidates=[{"text": "a train note"}]),  # cloze
    ]
    assert same not in others and len(set(others)) == len(others)


def test_per_record_parts_are_each_records_own_loss_and_make_the_perplexity(
    tiny_model, tiny_tokenizer
):
    """The promotion's paired comparison resamples these parts: each must be that record's
    summed token NLL (transformers' own loss times the tokens it averages over), and together
    they must give the reported perplexity."""
    from privtune.evaluate import evaluate_scored

    texts = synthetic_texts(7)
    records = [{"text": t} for t in texts]
    metrics, scores = evaluate_scored(tiny_model, tiny_tokenizer, records, 48, batch_size=3)
    parts = scores["test_perplexity"]
    assert len(parts) == 7 and metrics["test_perplexity"] == parts.value()
    data = encode_records(texts, tiny_tokenizer, 48)
    with torch.no_grad():
        for i in range(7):
            batch = data.batch(torch.tensor([i]))
            own = tiny_model(**batch).loss  # mean over the record's scored tokens
            tokens = int((batch["labels"][0, 1:] != -100).sum())
            assert parts.denominators[i] == tokens
            assert parts.numerators[i] == pytest.approx(float(own) * tokens, rel=1e-5)
    assert set(scores) == {"test_perplexity"}  # no task on these records: no accuracies
