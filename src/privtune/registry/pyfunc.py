"""The registered artifact: base model + LoRA adapter behind one `pyfunc` call.

`mlflow.pyfunc.load_model("models:/<name>@champion").predict(["Patient"])` loads both directories
from the model's artifacts (never a hub) and returns generated continuations; the model's
privacy model card is among those artifacts too.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

PROMPT_COLUMN = "prompt"
DEFAULT_MAX_NEW_TOKENS = 32
# What a loading environment needs; pinned to what is installed so nothing is inferred (MLflow's
# inference imports the model in a subprocess) and nothing has to be resolved online.
REQUIREMENTS = ("torch", "transformers", "tokenizers", "peft", "safetensors", "pandas")


def pip_requirements() -> list[str]:
    """Installed versions of the packages the model needs. `privtune` itself (it holds the
    class) is not on a package index: it must be importable where the model is loaded."""
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def signature() -> ModelSignature:
    """Prompts in, continuations out; generation settings as inference params."""
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # unnamed: a plain list of prompts passes
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS),
                ParamSpec("do_sample", "boolean", False),
                ParamSpec("seed", "long", 0),
            ]
        ),
    )


def _prompts(model_input: Any) -> list[str]:
    """A list of prompts, a string, or a DataFrame/Series with a `prompt` column."""
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        # MLflow hands a plain list over as a one-column frame (column 0).
        if PROMPT_COLUMN in model_input.columns:
            return [str(p) for p in model_input[PROMPT_COLUMN]]
        if len(model_input.columns) != 1:
            raise ValueError(f"input DataFrame needs a '{PROMPT_COLUMN}' column")
        return [str(p) for p in model_input.iloc[:, 0]]
    if isinstance(model_input, pd.Series):
        return [str(p) for p in model_input]
    return [str(p) for p in model_input]


class GenerationModel(mlflow.pyfunc.PythonModel):
    """A causal LM with a LoRA adapter, both stored as the model's artifacts."""

    # MLflow's own switch (its ChatModel sets it) for the type-hint validation of `predict`:
    # the signature is given (signature()), and without it every import of this class warned
    # to add type hints, under a "once" filter of MLflow's that no caller's filter can reach.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from privtune.modeling import load_adapter

        # MLflow's schema check quotes the whole input when it fails (a frame whose first
        # column is not the prompts): prompts may be patients' notes. Its own switch, unless
        # the loading process set it.
        os.environ.setdefault("MLFLOW_DISABLE_SCHEMA_DETAILS", "true")

        base = context.artifacts["base"]
        self.tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
        self.model = load_adapter(model, context.artifacts["adapter"]).eval()
        # The privacy model card travels with the weights: `unwrap_python_model().model_card`.
        card = context.artifacts.get("model_card")
        card_file = Path(card) / "model_card.json" if card else None
        self.model_card = (
            json.loads(card_file.read_text()) if card_file and card_file.is_file() else None
        )

    # No type hints on model_input: MLflow would derive a schema from them; ours is explicit.
    def predict(self, context, model_input, params=None):
        import torch

        from privtune.data.tokenization import bos_id
        from privtune.modeling import position_limit, quiet_padding_warning

        params = params or {}
        max_new = int(params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        do_sample = bool(params.get("do_sample", False))
        seed = int(params.get("seed", 0))
        limit = position_limit(self.model)  # GPT-2's n_positions, Llama's max_position_embeddings
        if not 0 < max_new < limit:
            raise ValueError(f"params.max_new_tokens must be in 1..{limit - 1} for this model")
        out: list[str] = []
        for prompt in _prompts(model_input):
            # Records were trained as [bos] text [eos]: a prompt starts a record the same way.
            tokens = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[bos_id(self.tokenizer)] + tokens])
            ids = ids[:, -max(1, limit - max_new) :]
            with torch.random.fork_rng(devices=[]), torch.no_grad(), quiet_padding_warning():
                torch.manual_seed(seed)
                generated = self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new,
                    do_sample=do_sample,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            out.append(
                self.tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
            )
        return out
