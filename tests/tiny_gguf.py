"""Tiny GGUF files written with the `gguf` package's GGUFWriter, laid out as llama.cpp's
converter lays out a Hugging Face Llama (same tensor names, q/k rows permuted for its rotary
layout, a byte-level BPE tokenizer), so the conversion code is tested without the real file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def tiny_llama(vocab_size: int, bos: int, eos: int, positions: int = 128, seed: int = 0):
    """A 2-layer Llama with grouped-query attention (4 heads, 2 key/value heads), hidden 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k projections (transformers reverses it when loading)."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _write_tokenizer(writer, tokenizer) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = {t["content"] for t in spec.get("added_tokens", [])}
    types = [3 if token in special else 1 for token in tokens]  # 3: control, 1: normal
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)


def write_llama_gguf(path: Path, model, tokenizer) -> Path:
    """Write ``model`` (a Hugging Face Llama) and ``tokenizer`` as a float32 GGUF file."""
    from gguf import GGUFWriter

    c = model.config
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    _write_tokenizer(writer, tokenizer)
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for layer in range(c.num_hidden_layers):
        for hf, gg in names.items():
            weights = state[f"model.layers.{layer}.{hf}.weight"]
            if gg == "attn_q":
                weights = _permute(weights, c.num_attention_heads)
            elif gg == "attn_k":
                weights = _permute(weights, c.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gg}.weight", np.ascontiguousarray(weights))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_unsupported_gguf(path: Path, architecture: str = "mamba") -> Path:
    """A header-only GGUF of another architecture: enough for the architecture check."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_name("not a llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
