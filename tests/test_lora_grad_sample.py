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


def _hook(model: torch.nn.Module) -> LoraGradSample:
    return LoraGradSample(model, [p for p in model.parameters() if p.requires_grad])


def _grad_samples(forward, model, batch) -> dict[str, torch.Tensor]:
    """Each trainable parameter's per-sample gradients of one summed-loss backward pass."""
    torch.manual_seed(7)  # the same dropout masks for every run
    logits = next_token_logits(forward, batch["input_ids"], batch["attention_mask"])
    per_sample_loss(logits, batch["labels"]).sum().backward()
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = getattr(p, "grad_sample", None)
            p.grad_sample, p.grad = None, None
    return out


@pytest.mark.parametrize(("kind", "dropout"), [("gpt2", 0.0), ("llama", 0.0), ("llama", 0.3)])
def test_per_sample_gradients_are_opacus_ones(kind, dropout, tiny_tokenizer):
    model = _lora_model(kind, tiny_tokenizer, dropout)
    data = encode_records(synthetic_texts(6, seed=3), tiny_tokenizer, 40)
    batch = data.batch(torch.arange(6))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert covers(model, trainable)

    hooks = _hook(model)
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
    hooks = _hook(model)
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
    hooks = _hook(model)
    with pytest.raises(ValueError, match="already on this model"):
        _hook(model)
    hooks.remove()
    _hook(model).remove()


def test_two_backward_passes_unclipped_fail_rather_than_mix_samples(tiny_tokenizer):
    model = _lora_model("gpt2", tiny_tokenizer)
    batch = encode_records(synthetic_texts(2), tiny_tokenizer, 32).batch(torch.arange(2))
    _hook(model)
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


@pytest.mark.parametrize("frozen", ["lora_A", "lora_B"])
def test_an_adapter_with_one_matrix_frozen_is_left_to_opacus(frozen, tiny_tokenizer):
    """With A frozen, h needs no gradient and B would go uncaptured; with B frozen, its
    per-sample gradients would pile up on a parameter nobody clips: opacus handles both."""
    from privtune.privacy.engine import PrivacyEngine

    model = _lora_model("gpt2", tiny_tokenizer)
    name = next(n for n, _ in model.named_parameters() if frozen in n)
    dict(model.named_parameters())[name].requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not covers(model, trainable)
    engine = PrivacyEngine.__new__(PrivacyEngine)  # wrap() reads the mechanism alone
    engine.mechanism = type("M", (), {"per_sample": True, "parameters": trainable})()
    engine._lora_hooks = None
    assert isinstance(engine.wrap(model), GradSampleModule)


def test_an_input_left_by_an_interrupted_forward_is_never_used(tiny_tokenizer):
    """An exception between an adapter's A and B leaves A's input behind; a later pass whose
    A keeps none (evaluation mode, gradients on) must not pair it with its own B."""
    model = _lora_model("llama", tiny_tokenizer)
    batch = encode_records(synthetic_texts(3), tiny_tokenizer, 32).batch(torch.arange(3))
    hooks = _hook(model)
    b = next(m for n, m in model.named_modules() if n.endswith("lora_B.default"))

    def fail(*_):
        raise KeyboardInterrupt

    handle = b.register_forward_pre_hook(fail)
    with pytest.raises(KeyboardInterrupt):
        model(input_ids=batch["input_ids"])
    handle.remove()
    assert hooks._inputs  # what the interrupted pass left
    for name, module in model.named_modules():
        if "lora_A" in name:
            module.eval()
    captured = _grad_samples(model, model, batch)  # B's hook must not take the stale input
    assert set(captured.values()) == {None}


def test_a_row_per_token_instead_of_per_record_is_refused():
    """A module fed (N*T, d) gives per-sample gradients of N*T rows: each would be clipped
    alone, so one record could move the sum by T thresholds. The loop says how many records
    a micro-batch holds, and the clipping refuses any other count."""
    from peft import LoraConfig, get_peft_model

    from privtune.privacy.action import Action
    from privtune.privacy.mechanisms import Gaussian

    class Flattening(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x.reshape(-1, 4)).reshape(x.shape)

    model = get_peft_model(Flattening(), LoraConfig(r=2, target_modules=["proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert covers(model, trainable)
    _hook(model)
    (model(torch.randn(3, 5, 4)) ** 2).sum().backward()  # 3 records of 5 tokens
    mech = Gaussian([trainable], ["all"], seed=0)
    spec = mech.admit(Action((1.0,), 1.0), 1.0)
    with pytest.raises(RuntimeError, match=r"\[15\] rows for a micro-batch of 3 records"):
        mech.accumulate(spec, records=3)


def test_records_without_per_sample_gradients_are_refused_even_beside_canaries(tiny_tokenizer):
    """LoRA modules in evaluation mode capture nothing; the audit's canaries rode with the
    records, and the step would have released the canaries alone as if the batch were there
    (opacus failed here; the hooks must too)."""
    from privtune.train import Trainer

    base = tiny_llama(len(tiny_tokenizer), tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id)
    model = attach_lora(base, LoraParams(r=4), seed=0)
    data = encode_records(synthetic_texts(64, seed=1), tiny_tokenizer, 32)
    params = FinetuneParams(
        secret_noise=False, batch_size=16, epochs=0.5, delta=1e-3, audit_canaries=16
    )
    trainer = Trainer(model, data, data.slice(0, 8), params, "dpsgd", {})
    trainer.decide(0, float("nan"))
    model.eval()
    step, indices = next(trainer.batches())
    with pytest.raises(RuntimeError, match="no per-sample gradient"):
        trainer.step(step, indices)


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
