"""Base models (built and pretrained here, or loaded from a local directory) and LoRA."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from privtune.config import BaseParams, LoraParams
from privtune.errors import ConfigError, ModelError


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("device", f"unknown device '{name}'", "use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA requested but not available", "use device: auto")
    return device


def build_gpt2(params: BaseParams, vocab_size: int, bos: int, eos: int) -> GPT2LMHeadModel:
    if params.n_embd % params.n_head:
        raise ConfigError("base.n_embd", "must be divisible by base.n_head", "e.g. 128 with 4")
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=params.max_length,
        n_embd=params.n_embd,
        n_layer=params.n_layer,
        n_head=params.n_head,
        # torch's fused tanh GELU: the same function as GPT-2's gelu_new in one kernel
        activation_function="gelu_pytorch_tanh",
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return GPT2LMHeadModel(config)


def load_pretrained(path: str | Path, field: str = "base.pretrained_path"):
    """Load any local causal LM and its tokenizer; never reaches for a model hub."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(field, f"'{path}' is not a directory", "point it at a save_pretrained dir")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(
            field,
            f"cannot load a causal LM and tokenizer from '{path}' ({type(err).__name__})",
            "save both with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)",
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def attach_lora(model: torch.nn.Module, params: LoraParams, seed: int = 0) -> PeftModel:
    """Freeze the base model and add LoRA adapters (seeded init) on the target modules."""
    targets = [
        m for name, m in model.named_modules() if name.split(".")[-1] in params.target_modules
    ]
    if not targets:
        raise ConfigError(
            "finetune.lora.target_modules",
            f"none of {params.target_modules} is a module of this model",
            "name linear layers of the model (GPT-2: c_attn, c_proj, c_fc; Llama: q_proj, v_proj)",
        )
    config = LoraConfig(
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=list(params.target_modules),
        fan_in_fan_out=isinstance(targets[0], Conv1D),  # GPT-2 stores weights transposed
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` (FutureWarning)
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        torch.manual_seed(seed)
        return get_peft_model(model, config)


_ADAPTER = re.compile(r"^(.*)\.lora_[AB]\.")


def adapter_groups(model: torch.nn.Module, grouping: str) -> tuple[list[str], list[list]]:
    """Trainable parameters grouped for clipping: all in one, or one group per LoRA adapter."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if grouping == "flat":
        return ["all"], [[p for _, p in named]]
    groups: dict[str, list] = {}
    for name, param in named:
        match = _ADAPTER.match(name)
        key = match.group(1) if match else name
        key = key.removeprefix("_module.").removeprefix("base_model.model.")
        groups.setdefault(key, []).append(param)
    return list(groups), list(groups.values())
