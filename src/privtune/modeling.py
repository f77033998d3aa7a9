"""Base models (built and pretrained here, or loaded from a local directory) and LoRA."""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from privtune.config import BaseParams, LoraParams
from privtune.errors import ConfigError, ModelError


def resolve_device(name: str, field: str = "device") -> torch.device:
    """`auto` picks CUDA when present; anything else is passed to torch.device. ``field``:
    the parameter it came from, named in the error (``finetune.device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(field, f"unknown device '{name}'", "use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            field,
            f"'{name}' requested but CUDA is not available on this machine",
            f"set {field}: auto (CUDA when present, else cpu) or cpu",
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            field,
            f"'{name}' requested but this machine has {torch.cuda.device_count()} GPU(s)",
            f"set {field}: auto or cuda:0",
        )
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


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def check_weights(file: Path, field: str) -> None:
    """A safetensors file whose header parses and whose size matches it: a truncated copy or a
    corrupt download is named here, not as a SafetensorError from deep inside a load.

    Hand-written (8-byte length, JSON header, data offsets: the format's whole layout) because
    safetensors' own reader only fails when loading, without the file's name or what is wrong.
    """
    fix = f"copy or save {file.name} again (model.save_pretrained), then rerun"
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelError(field, f"{file} is truncated ({size} bytes: no header)", fix)
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise ModelError(
                field, f"{file} is truncated or corrupt (header of {length} bytes in {size})", fix
            )
        try:
            header = json.loads(handle.read(length))
            ends = [
                int(entry["data_offsets"][1])
                for name, entry in header.items()
                if name != "__metadata__"
            ]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ModelError(field, f"{file} is corrupt (unreadable header)", fix) from None
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        raise ModelError(
            field, f"{file} is truncated ({size} of the {expected} bytes its header lists)", fix
        )
    if size > expected:
        raise ModelError(
            field, f"{file} is corrupt ({size - expected} bytes beyond its tensors)", fix
        )


def check_model_dir(path: Path, field: str) -> None:
    """A save_pretrained directory is complete before anything is loaded or written: a
    readable config.json and weights whose size matches their header."""
    fix = "point it at a directory written by model.save_pretrained and tokenizer.save_pretrained"
    if not path.is_dir():
        raise ModelError(field, f"'{path}' is not a directory", fix)
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(field, f"'{path}' has no config.json", fix)
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise ModelError(field, f"{config} is corrupt (not a JSON object)", fix) from None
    present = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not present:
        raise ModelError(field, f"'{path}' has no weights ({', '.join(WEIGHT_FILES)})", fix)
    if present[0].name == "model.safetensors":
        check_weights(present[0], field)
    elif present[0].name.endswith(".index.json"):  # sharded: every shard it names
        try:
            shards = sorted(set(json.loads(present[0].read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(field, f"{present[0]} is corrupt (no weight_map)", fix) from None
        for shard in shards:
            if not (path / shard).is_file():
                raise ModelError(field, f"'{path}' lacks the shard {shard}", fix)
            check_weights(path / shard, field)


def load_pretrained(path: str | Path, field: str = "base.source"):
    """Load any local causal LM and its tokenizer; never reaches for a model hub.

    transformers loads what it can and initialises the rest at random, with a warning: weights
    saved under other names, or a tokenizer missing from the directory, would give a random
    model or empty encodings that fail (or train) later. Both are refused here instead."""
    path = Path(path)
    check_model_dir(path, field)
    fix = "save both with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        problem = f"cannot load a causal LM and tokenizer from '{path}' ({type(err).__name__})"
        raise ModelError(field, problem, fix) from None
    except RuntimeError as err:
        if "mismatch" not in str(err):
            raise
        raise ModelError(
            field, f"the weights in '{path}' do not have the shapes config.json gives", fix
        ) from None
    check_loaded(model, tokenizer, info, path, field)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_loaded(model, tokenizer, info: dict, path: Path, field: str) -> None:
    """The loaded model has every weight from the files, and the tokenizer fits it."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ModelError(
            field,
            f"the weights in '{path}' lack {len(missing)} of the model's tensors ({shown}): "
            "they would start at random",
            "save the model with model.save_pretrained(dir) from the same architecture as its "
            "config.json (weights saved under other names do not load)",
        )
    if not tokenizer("The patient was seen today.")["input_ids"]:
        raise ModelError(
            field,
            f"the tokenizer loaded from '{path}' turns text into no tokens (no tokenizer files?)",
            "save the model's tokenizer into the directory: tokenizer.save_pretrained(dir)",
        )
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelError(
            field,
            f"the tokenizer in '{path}' has {len(tokenizer):,} tokens, the model's embeddings "
            f"{rows:,} rows",
            "save the tokenizer the model was trained with, or grow the embeddings first "
            "(model.resize_token_embeddings(len(tokenizer)), then save_pretrained)",
        )


def position_limit(model: torch.nn.Module) -> int:
    """Positions the model can attend to (GPT-2's ``n_positions``, Llama's
    ``max_position_embeddings``)."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)


# LoRA targets of `finetune.lora.target_modules: auto`, by `config.model_type`. Every linear
# layer of the blocks: adapting attention and MLP projections alike is what matches full
# fine-tuning best (Dettmers et al. 2023, QLoRA; the original LoRA paper adapted q and v
# only: `target_modules: [q_proj, v_proj]` is that choice, at about a fifth of the parameters).
# Measured on SmolLM2 (README, benchmarks/results/lora_targets.json): all seven are 8 % better
# non-privately and 14 % under DP-SGD at eps 8, for 20 % more time per step on a CPU.
AUTO_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def lora_targets(model: torch.nn.Module, target_modules: list[str] | str) -> list[str]:
    """The module names LoRA adapts: the given list, or the architecture's for `auto`."""
    if target_modules != "auto":
        return list(target_modules)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in AUTO_LORA_TARGETS:
        known = ", ".join(sorted(AUTO_LORA_TARGETS))
        raise ConfigError(
            "finetune.lora.target_modules",
            f"no automatic LoRA targets for architecture '{model_type}' (known: {known})",
            "list the model's linear layers, e.g. target_modules: [q_proj, v_proj]",
        )
    return list(AUTO_LORA_TARGETS[model_type])


def attach_lora(model: torch.nn.Module, params: LoraParams, seed: int = 0) -> PeftModel:
    """Freeze the base model and add LoRA adapters (seeded init) on the target modules."""
    names = lora_targets(model, params.target_modules)
    targets = [m for name, m in model.named_modules() if name.split(".")[-1] in names]
    if not targets:
        raise ConfigError(
            "finetune.lora.target_modules",
            f"none of {names} is a module of this model",
            "name linear layers of the model (GPT-2: c_attn, c_proj, c_fc; Llama: q_proj, "
            "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), or use `auto`",
        )
    config = LoraConfig(
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=names,
        fan_in_fan_out=isinstance(targets[0], Conv1D),  # GPT-2 stores weights transposed
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), _peft_quietly():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


@contextlib.contextmanager
def _peft_quietly() -> Iterator[None]:
    """peft reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning each
    time it wraps a model): not ours to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        yield


def load_adapter(model: torch.nn.Module, path: str | Path) -> PeftModel:
    """``model`` with the LoRA adapter saved at ``path`` (peft's own loader)."""
    with _peft_quietly():
        return PeftModel.from_pretrained(model, path)


@contextlib.contextmanager
def quiet_padding_warning() -> Iterator[None]:
    """generate() hands its first forward pass no attention mask when the one given is all
    ones, and that pass then warns that input_ids hold the pad token: wherever pad = bos (GPT-2's
    tokenizers, and ours), once per process. Nothing is padded there: silence it for the call."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


_ADAPTER = re.compile(r"^(.*)\.lora_[AB]\.")
_LAYER = re.compile(r"^(?:.*\.)?\d+\.")  # the path up to the layer's index: `layers.3.`
_WRAPPERS = ("_module.", "base_model.model.")  # opacus' GradSampleModule, peft's PeftModel


def _backbone_prefix(model: torch.nn.Module) -> str:
    """The causal LM's backbone attribute (`transformer` for GPT-2, `model` for Llama), which
    every adapter name repeats."""
    from privtune.losses import _innermost

    prefix = getattr(_innermost(model), "base_model_prefix", "")
    return f"{prefix}." if prefix else ""


GROUPINGS = ("flat", "per_adapter", "per_projection")


def group_of(adapter: str, grouping: str) -> str:
    """The clipping group of an adapter (named as :func:`adapter_groups` names it): "all",
    the adapter itself, or its projection, the adapter's path without the layer
    (`self_attn.q_proj`, `mlp.down_proj`; GPT-2's `attn.c_proj` and `mlp.c_proj` stay two):
    the same projection of every layer in one group."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {', '.join(GROUPINGS)}, not '{grouping}'")
    if grouping == "flat":
        return "all"
    return _LAYER.sub("", adapter, count=1) if grouping == "per_projection" else adapter


def adapter_groups(model: torch.nn.Module, grouping: str) -> tuple[list[str], list[list]]:
    """Trainable parameters grouped for clipping: all in one, one group per LoRA adapter, or
    one per projection across layers (GROUPINGS).

    An adapter is named by its module's path inside the backbone (GPT-2: `h.0.attn.c_attn`;
    Llama: `layers.0.self_attn.q_proj`, `layers.0.mlp.down_proj`): short enough for MLflow
    metric names (`clip/<name>`), and the layer and projection stay readable.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = _backbone_prefix(model)
    groups: dict[str, list] = {}
    for name, param in named:
        match = _ADAPTER.match(name)
        key = match.group(1) if match else name
        for wrapper in _WRAPPERS:
            key = key.removeprefix(wrapper)
        key = key.removeprefix(backbone) if backbone else key
        groups.setdefault(group_of(key, grouping), []).append(param)
    return list(groups), list(groups.values())
