"""Base models load from local directories only; LoRA attaches to the right modules."""

import pytest

from privtune.config import LoraParams
from privtune.errors import ConfigError, ModelError
from privtune.modeling import adapter_groups, attach_lora, load_pretrained


def test_local_model_directory_round_trip(tmp_path, tiny_model, tiny_tokenizer):
    tiny_model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, tokenizer = load_pretrained(tmp_path / "m")
    assert model.config.n_embd == 32
    assert tokenizer("cough fever")["input_ids"] == tiny_tokenizer("cough fever")["input_ids"]


def test_missing_or_broken_model_directory(tmp_path):
    with pytest.raises(ModelError, match=r"base\.source.*not a directory"):
        load_pretrained(tmp_path / "absent")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"base\.source.*config\.json is corrupt") as err:
        load_pretrained(tmp_path / "broken")
    assert "save_pretrained" in str(err.value)


def test_truncated_or_corrupt_weights_are_named(tiny_model, tmp_path):
    """A copy cut short or overwritten says which file and what is wrong, before any load."""
    tiny_model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"model\.safetensors is truncated") as err:
        load_pretrained(tmp_path / "m", field="base.source")
    assert "Fix:" in str(err.value)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"garbage!" * 4)
    with pytest.raises(ModelError, match=r"model\.safetensors is corrupt"):
        load_pretrained(tmp_path / "m")
    weights.unlink()
    with pytest.raises(ModelError, match="has no weights"):
        load_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ModelError, match="has no config.json"):
        load_pretrained(tmp_path / "m")


def test_lora_freezes_base_and_groups_adapters(tiny_model):
    model = attach_lora(tiny_model, LoraParams(r=4, target_modules=["c_attn", "c_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    names, groups = adapter_groups(model, "per_adapter")
    # one block: attn.c_attn, attn.c_proj, mlp.c_proj -> three adapters of (A, B)
    assert names == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_proj"]
    assert all(len(g) == 2 for g in groups)
    assert adapter_groups(model, "flat")[0] == ["all"]


def test_unknown_target_modules(tiny_model):
    with pytest.raises(ConfigError, match=r"finetune\.lora\.target_modules"):
        attach_lora(tiny_model, LoraParams(target_modules=["q_proj"]))


def test_every_shard_of_a_sharded_checkpoint_is_checked(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m", max_shard_size="40KB")
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "m" / "model.safetensors.index.json").is_file()
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[:-10])
    with pytest.raises(ModelError, match=rf"{shards[-1].name} is truncated"):
        load_pretrained(tmp_path / "m")
    shards[-1].unlink()
    with pytest.raises(ModelError, match=rf"lacks the shard {shards[-1].name}"):
        load_pretrained(tmp_path / "m")


def test_weights_that_do_not_fit_the_config_are_refused_not_started_at_random(
    tmp_path, tiny_model, tiny_tokenizer
):
    """transformers loads what matches and initialises the rest at random (a warning only): a
    model saved under other tensor names, or with other shapes, would train from noise."""
    from safetensors.torch import load_file, save_file

    tiny_model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(weights)
    renamed = {f"backbone.{name}": value for name, value in tensors.items()}
    save_file(renamed, weights, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"base\.source.*lack \d+ of the model's tensors") as err:
        load_pretrained(tmp_path / "m")
    assert "transformer.h.0" in str(err.value) and "Fix:" in str(err.value)
    one_short = dict(tensors)
    del one_short["transformer.h.0.attn.c_attn.bias"]
    save_file(one_short, weights, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"lack 1 of the model's tensors \(transformer.h.0.attn"):
        load_pretrained(tmp_path / "m")
    save_file(tensors, weights, metadata={"format": "pt"})
    load_pretrained(tmp_path / "m")  # the same files, whole: loads
    config = tmp_path / "m" / "config.json"
    config.write_text(config.read_text().replace('"n_embd": 32', '"n_embd": 16'))
    with pytest.raises(ModelError, match="do not have the shapes config.json gives"):
        load_pretrained(tmp_path / "m")


def test_a_tokenizer_missing_or_too_large_for_the_model_is_refused(
    tmp_path, tiny_model, tiny_tokenizer
):
    """Without tokenizer files AutoTokenizer still returns one, which encodes nothing; a
    tokenizer of another model indexes past the embeddings. Both fail late without this."""
    tiny_model.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelError, match="turns text into no tokens") as err:
        load_pretrained(tmp_path / "m")
    assert "tokenizer.save_pretrained" in str(err.value)
    tiny_tokenizer.add_tokens([f"extra{k}" for k in range(5)])
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    rows = tiny_model.get_input_embeddings().num_embeddings
    with pytest.raises(ModelError, match=f"{len(tiny_tokenizer)} tokens.*{rows} rows"):
        load_pretrained(tmp_path / "m")
