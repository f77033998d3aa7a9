"""The real SmolLM2-135M: its packaged GGUF converts to a re-savable float32 Llama that still
knows English, and three DP-SGD steps through train() move the LoRA weights and no base weight.

Slow (about a minute on 2 CPU cores) and skipped when the `smollm2` extra is not installed
(`make install-smollm2`).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from privtune.config import FinetuneParams, LoraParams
from privtune.data.tokenization import bos_id, encode_records
from privtune.modeling import AUTO_LORA_TARGETS, adapter_groups, attach_lora, load_pretrained
from privtune.sources import SMOLLM2_135M, convert_gguf, locate
from tests.conftest import synthetic_texts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(p) is None for p in (SMOLLM2_135M.package, "gguf")),
        reason=f"needs the smollm2 extra: {SMOLLM2_135M.install}",
    ),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The packaged GGUF converted and saved as the base stage saves it, then reloaded."""
    out = tmp_path_factory.mktemp("smollm2") / "base"
    model, tokenizer = convert_gguf(locate(SMOLLM2_135M), SMOLLM2_135M.document_token)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return out


def test_conversion_is_an_ordinary_llama_that_knows_english(converted, tmp_path):
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == (
        "llama",
        30,
        576,
    )
    model, tokenizer = load_pretrained(converted)
    model.save_pretrained(tmp_path / "again")  # re-savable: the failure smollm2.md recorded
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    prompt = "Patient admitted with community-acquired pneumonia. Treated with"
    ids = torch.tensor([[bos_id(tokenizer)] + tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert "antibiotic" in tokenizer.decode(out[0, ids.shape[1] :])


def test_three_dp_steps_move_the_lora_weights_and_not_the_base(converted):
    from privtune.train import train

    model, tokenizer = load_pretrained(converted)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model = attach_lora(model, LoraParams(r=4, target_modules="auto"), seed=0)
    names, _ = adapter_groups(model, "per_adapter")
    assert len(names) == 30 * len(AUTO_LORA_TARGETS["llama"])
    assert names[0] == "layers.0.self_attn.q_proj" and names[-1] == "layers.29.mlp.down_proj"
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = encode_records(synthetic_texts(32, words=12), tokenizer, 24)
    params = FinetuneParams(
        batch_size=4, epochs=0.375, delta=1e-3, eval_every=100, eval_records=4, audit_canaries=0
    )
    result = train(model, data, data.slice(0, 4), params, "dpsgd", {}, show_progress=False)
    assert result.steps_taken == 3 and 0 < result.epsilon <= params.epsilon
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not p.equal(lora[n])}
    assert moved == set(lora)
    state = {k.removeprefix("base_model.model."): v for k, v in model.state_dict().items()}
    for name, weight in base.items():
        key = name.replace(".weight", ".base_layer.weight")
        assert torch.equal(state.get(key, state.get(name)), weight), name


def test_the_benchmarks_random_smollm2_is_its_architecture(converted, monkeypatch):
    """`step_overhead.py --smollm2-weights random` (a GPU machine without the package) builds
    the converted model's architecture: the same config and the same tensors, shape by shape."""
    from tests.test_benchmarks import ROOT, _load

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load("step_overhead")
    committed = json.loads(bench.SMOLLM2_CONFIG.read_text())
    config = json.loads((converted / "config.json").read_text())
    assert {key: config.get(key) for key in committed} == committed
    with torch.device("meta"):
        random = bench.smollm2_architecture()
    model, _ = load_pretrained(converted)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(random) == shapes(model)
