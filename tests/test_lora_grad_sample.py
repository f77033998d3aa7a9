"""privtune's LoRA per-sample gradient hooks against opacus' GradSampleModule: the same
per-sample gradients (GPT-2's transposed Conv1D and a Llama, with LoRA dropout), the same
trained adapter and ledger through the loop, opacus wherever they would not cover every
trainable parameter, and a loud failure where per-sample gradients would be mixed."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule

from privtune.config import FinetuneParams, LoraParams
from privtune.data.tokenization import encode_records
from privtune.losses import next_token_logits, per_sample_loss
from privtune.modeling import attach_lora
from privtune.privacy.lora_grad_sample import LoraGradSample, covers
from privtune.train import train
from tests.conftest import synthetic_texts
from tests.tiny_gguf import tiny_llama

# opacus' full backward hooks on modules whose inputs need no gradient (the frozen base)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def _lora_model(kind: str, tokenizer, dropout: float = 0.0) -> torch.nn.Module:
    """A tiny GPT-2 (the fixture's) or Llama with LoRA, B drawn at random: at peft's zero
    init, A's per-sample gradients are zero and a comparison would prove nothing for A."""
    torch.manual_seed(0)
    if kind == "llama":
        base = tiny_llama(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    else:
        from privtune.config import BaseParams
        from privtune.modeling import build_gpt2

        params = BaseParams(n_layer=1, n_head=2, n_embd=32, max_length=64)
        base = build_gpt2(params, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = attach_lora(base, LoraParams(r=4, dropout=dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    return model


def _grad_samples(forward, model, batch) -> dict[str, torch.Tensor]:
    """Each trainable parameter's per-sample gradients of one summed-loss backward pass."""
    torch.manual_seed(7)  # the same dropout masks for every run
    logits = next_token_logits(forward, batch["input_ids"], batch["attention_mask"])
    per_sample_loss(logits, batch["labels"]).sum().backward()
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = p.grad_sample
            p.grad_sample, p.grad = None, None
    return out


@pytest.mark.parametrize(("kind", "dropout"), [("gpt2", 0.0), ("llama", 0.0), ("llama", 0.3)])
def test_per_sample_gradients_are_opacus_ones(kind, dropout, tiny_tokenizer):
    model = _lora_model(kind, tiny_tokenizer, dropout)
    data = encode_records(synthetic_texts(6, seed=3), tiny_tokenizer, 40)
    batch = data.batch(torch.arange(6))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert covers(model, trainable)

    hooks = LoraGradSample(model)
    ours = _grad_samples(model, model, batch)
    hooks.remove()
    theirs = _grad_samples(
        GradSampleModule(model, batch_first=True, loss_reduction="sum"), model, batch
    )

    assert ours.keys() == theirs.keys() and len(ours) == len(trainable)
    for name in ours:
        assert ours[name].shape == (6, *dict(model.named_parameters())[name].shape), name
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)
    assert any(ours[n].abs().sum() > 0 for n in ours if "lora_A" in n)  # A's were compared


def test_evaluation_keeps_nothing_and_removal_detaches(tiny_tokenizer):
    model = _lora_model("llama", tiny_tokenizer)
    batch = encode_records(synthetic_texts(3), tiny_tokenizer, 32).batch(torch.arange(3))
    hooks = LoraGradSample(model)
    with torch.no_grad():  # evaluation: no activation kept for a backward that never comes
        model(input_ids=batch["input_ids"])
    assert not hooks._inputs
    assert all(g.shape[0] == 3 for g in _grad_samples(model, model, batch).values())
    hooks.remove()
    logits = next_token_logits(model, batch["input_ids"], batch["attention_mask"])
    per_sample_loss(logits, batch["labels"]).sum().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


def test_a_model_takes_one_set_of_hooks_until_they_are_removed(tiny_tokenizer):
    model = _lora_model("gpt2", tiny_tokenizer)
    hooks = LoraGradSample(model)
    with pytest.raises(ValueError, match="already on this model"):
        LoraGradSample(model)
    hooks.remove()
    LoraGradSample(model).remove()


def test_two_backward_passes_unclipped_fail_rather_than_mix_samples(tiny_tokenizer):
    model = _lora_model("gpt2", tiny_tokenizer)
    batch = encode_records(synthetic_texts(2), tiny_tokenizer, 32).batch(torch.arange(2))
    LoraGradSample(model)
    for attempt in range(2):
        logits = next_token_logits(model, batch["input_ids"], batch["attention_mask"])
        loss = per_sample_loss(logits, batch["labels"]).sum()
        if attempt == 0:
            loss.backward()
        else:
            with pytest.raises(RuntimeError, match="captured twice"):
                loss.backward()


def test_anything_else_trainable_is_left_to_opacus(tiny_tokenizer):
    model = _lora_model("llama", tiny_tokenizer)
    embedding = model.get_input_embeddings().weight
    embedding.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not covers(model, trainable)
    assert not covers(model, [])


def _train(model, tokenizer, grad_sampler: str, method: str = "dpsgd", **update):
    data = encode_records(synthetic_texts(96, seed=1), tokenizer, 48)
    params = FinetuneParams(
        secret_noise=False,
        batch_size=16,
        epochs=0.5,
        delta=1e-3,
        eval_every=100,
        audit_canaries=16,
        grad_sampler=grad_sampler,
        lora=LoraParams(r=4),
        **update,
    )
    result = train(model, data, data.slice(0, 8), params, method, {}, show_progress=False)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return result, state


@pytest.mark.parametrize(
    ("method", "update"),
    [("dpsgd", {}), ("psac", {"physical_batch_size": 5}), ("lmo", {})],
)
def test_the_loop_trains_the_same_adapter_and_ledger_as_with_opacus(tiny_tokenizer, method, update):
    base = tiny_llama(len(tiny_tokenizer), tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id)
    runs = {}
    for sampler in ("auto", "opacus"):
        model = attach_lora(copy.deepcopy(base), LoraParams(r=4), seed=0)
        runs[sampler] = _train(model, tiny_tokenizer, sampler, method, **update)
    (ours, ours_state), (theirs, theirs_state) = runs["auto"], runs["opacus"]
    assert ours.steps_taken == theirs.steps_taken > 0
    assert ours.ledger.state_dict() == theirs.ledger.state_dict()
    assert ours.epsilon == theirs.epsilon
    for name in theirs_state:
        torch.testing.assert_close(ours_state[name], theirs_state[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(  # the audit's canaries went through the same clipping
        torch.as_tensor(ours.audit.scores), torch.as_tensor(theirs.audit.scores)
    )
