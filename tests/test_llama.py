"""A Llama base model through the whole pipeline on the CPU: a tiny LlamaForCausalLM (2 layers,
hidden 32, grouped-query attention) saved as a local directory runs base, finetune (LoRA on
the architecture's projections), evaluate, every attack (the base as the MIA reference),
register and generation from the registry."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from privtune.cli import main
from privtune.config import FinetuneParams, LoraParams
from privtune.data.tokenization import encode_records
from privtune.modeling import AUTO_LORA_TARGETS, adapter_groups, attach_lora
from tests.conftest import synthetic_texts, write_params
from tests.tiny_gguf import tiny_llama

LLAMA_TARGETS = AUTO_LORA_TARGETS["llama"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_tokenizer):
    """Every stage of the pipeline on a tiny Llama, run through the CLI as dvc.yaml runs it."""
    root = tmp_path_factory.mktemp("llama")
    tok = tiny_tokenizer
    model = tiny_llama(len(tok), tok.bos_token_id, tok.eos_token_id, positions=96)
    model.save_pretrained(root / "tiny-llama")
    tok.save_pretrained(root / "tiny-llama")
    write_params(
        root / "params.yaml",
        base={"source": "tiny-llama", "max_length": "auto"},
        finetune={"delta": 1e-5, "audit_canaries": 32, "lora": {"r": 4, "target_modules": "auto"}},
        methods={"nonprivate": {}, "dpsgd": {"clip": 1.0}, "per_adapter": {"clip": 1.0}},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own sqlite store
        mp.chdir(root)
        stages = [
            ["prepare"],
            ["base"],
            *(["finetune", m] for m in ("nonprivate", "dpsgd", "per_adapter")),
            *([stage, m] for stage in ("evaluate", "attack") for m in ("nonprivate", "dpsgd")),
            ["register", "nonprivate", "dpsgd"],
        ]
        for stage in stages:
            assert main(["--root", str(root), "--no-progress", *stage]) == 0, stage
        yield root


def _json(path):
    return json.loads(path.read_text())


def test_base_keeps_the_llama_and_derives_max_length(project):
    metrics = _json(project / "metrics/base.json")
    assert metrics["architecture"] == "llama" and metrics["source"] == "tiny-llama"
    assert "public_valid_perplexity" not in metrics  # loaded, not pretrained here
    # byte-level pieces make the notes longer than the tiny model's 96 positions: capped
    info = _json(project / "models/base/privtune.json")
    assert info["max_length"] == metrics["max_length"] == 96 and "capped" in info["max_length_rule"]
    assert metrics["test_records"] == 8  # evaluate.max_records bounds the base evaluation too
    assert metrics["test_perplexity"] > 1 and 0 <= metrics["medication_accuracy"] <= 1


def test_finetune_adapts_every_llama_projection_with_readable_adapter_names(project):
    adapter = _json(project / "models/per_adapter/adapter/adapter_config.json")
    assert sorted(adapter["target_modules"]) == sorted(LLAMA_TARGETS)
    history = _json(project / "models/per_adapter/history.json")
    clips = {k.removeprefix("clip/") for k in history[0] if k.startswith("clip/")}
    assert clips == {
        f"layers.{layer}.{part}.{name}"
        for layer in (0, 1)
        for part, names in (("self_attn", LLAMA_TARGETS[:4]), ("mlp", LLAMA_TARGETS[4:]))
        for name in names
    }
    dpsgd = _json(project / "metrics/finetune-dpsgd.json")
    assert 0.9 * 4.0 <= dpsgd["epsilon"] <= 4.0 and dpsgd["steps"] > 0


def test_evaluate_and_every_attack_on_the_llama(project):
    for name in ("nonprivate", "dpsgd"):
        evaluated = _json(project / f"metrics/evaluate-{name}.json")
        assert evaluated["test_perplexity"] > 1 and "medication_accuracy" in evaluated
        attacked = _json(project / f"metrics/attack-{name}.json")
        for score in ("loss", "reference", "zlib", "min_k"):  # reference: the base model
            assert 0 <= attacked[f"mia_{score}_auc"] <= 1
        assert "exposure_r4_mean" in attacked and "exposure_held_out_mean" in attacked
        assert "extraction_greedy_r4" in attacked
        assert attacked["audit_whitebox_m"] == 32 and attacked["audit_blackbox_m"] == 16
    dpsgd = _json(project / "metrics/attack-dpsgd.json")
    assert dpsgd["audit_epsilon_lower_bound"] <= dpsgd["claimed_epsilon"]
    # the base's scores, the same for both methods, scored by the first attack only: its
    # exposure ranking, its losses of the membership records and of the audit canaries
    kept = sorted(p.name.split("-")[0] for p in (project / ".privtune/cache").iterdir())
    assert kept == ["exposure", "membership", "membership"]


def test_registered_llama_generates_from_the_registry(project, monkeypatch):
    import mlflow

    monkeypatch.chdir(project)
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    # `register nonprivate dpsgd`: dpsgd, registered last, holds the challenger alias
    loaded = mlflow.pyfunc.load_model("models:/privtune-clinical-notes@challenger")
    generated = loaded.predict(["Patient presents with"], params={"max_new_tokens": 6})
    assert len(generated) == 1 and isinstance(generated[0], str)
    sampled = {"do_sample": True, "seed": 1, "max_new_tokens": 6}
    assert loaded.predict(["fever"], params=sampled) == loaded.predict(["fever"], params=sampled)
    with pytest.raises(ValueError, match="max_new_tokens must be in 1..95"):
        loaded.predict(["fever"], params={"max_new_tokens": 96})  # Llama's position limit


def test_q_and_v_only_is_one_setting(tiny_tokenizer):
    tok = tiny_tokenizer
    model = tiny_llama(len(tok), tok.bos_token_id, tok.eos_token_id)
    model = attach_lora(model, LoraParams(r=2, target_modules=["q_proj", "v_proj"]))
    names, groups = adapter_groups(model, "per_adapter")
    assert names == [f"layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert all(len(group) == 2 for group in groups)  # A and B of one module, clipped jointly


def test_projection_groups_gather_each_projection_across_layers(tiny_tokenizer):
    """RLDP's `groups: projection`: one threshold per projection (7 on a Llama with every
    projection adapted, against 7 per layer per adapter), each group the adapters of every
    layer, every trainable parameter in exactly one group."""
    from privtune.modeling import group_of

    tok = tiny_tokenizer
    model = attach_lora(tiny_llama(len(tok), tok.bos_token_id, tok.eos_token_id), LoraParams(r=2))
    adapters, per_adapter = adapter_groups(model, "per_adapter")
    names, groups = adapter_groups(model, "per_projection")
    assert len(adapters) == 2 * len(LLAMA_TARGETS)
    assert names == [a.removeprefix("layers.0.") for a in adapters if a.startswith("layers.0.")]
    assert [name.rsplit(".", 1)[1] for name in names] == list(LLAMA_TARGETS)
    assert [len(group) for group in groups] == [2 * 2] * len(LLAMA_TARGETS)  # A, B x 2 layers
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, (p for g in groups for p in g))) == sorted(map(id, trainable))
    for adapter, params in zip(adapters, per_adapter, strict=True):  # the names agree
        group = groups[names.index(group_of(adapter, "per_projection"))]
        assert all(any(p is q for q in group) for p in params)
    assert adapter_groups(model, "flat")[0] == ["all"]
    with pytest.raises(ValueError, match="grouping must be one of"):
        adapter_groups(model, "per_layer")


def test_dp_training_moves_the_lora_weights_and_not_the_base(tiny_tokenizer):
    """Three DP-SGD steps through train(): every adapter moves, no base weight does (the known
    silent failure: opacus hooks that never reach the LoRA parameters)."""
    from privtune.train import train

    tok = tiny_tokenizer
    model = tiny_llama(len(tok), tok.bos_token_id, tok.eos_token_id)
    base = copy.deepcopy(model.state_dict())
    model = attach_lora(model, LoraParams(r=4), seed=0)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(lora) == 2 * 2 * len(LLAMA_TARGETS)
    data = encode_records(synthetic_texts(64), tok, 48)
    params = FinetuneParams(
        batch_size=16, epochs=0.75, delta=1e-3, eval_every=100, audit_canaries=0
    )
    result = train(model, data, data.slice(0, 8), params, "dpsgd", {}, show_progress=False)
    assert result.steps_taken == 3 and result.epsilon <= params.epsilon
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not p.equal(lora[n])}
    # every A and B of every adapter: each is a target of the clipped, noised update
    assert moved == set(lora)
    merged = {k.removeprefix("base_model.model."): v for k, v in model.state_dict().items()}
    for name, weight in base.items():
        key = name.replace(".weight", ".base_layer.weight")
        assert torch.equal(merged.get(key, merged.get(name)), weight), name


def test_continuation_scores_with_the_llama_kv_cache_match_the_uncached_reference(tiny_tokenizer):
    """The medication task and canary exposure share one prompt's cache across candidates:
    with Llama's grouped-query cache and rotary positions the scores must stay exact."""
    from privtune.evaluate import continuation_logprobs, continuation_logprobs_uncached

    tok = tiny_tokenizer
    model = tiny_llama(len(tok), tok.bos_token_id, tok.eos_token_id)
    prompt = "patient presents with fever and cough. plan: start "
    candidates = ["metformin", "lisinopril", "salbutamol", "asthma plan", "heart"]
    cached = continuation_logprobs(model, tok, prompt, candidates)
    reference = continuation_logprobs_uncached(model, tok, prompt, candidates)
    assert torch.allclose(cached, reference, atol=1e-4)
