"""Warm-start RLDP's hyper-policy on PUBLIC data, so a private run starts with a trained critic.

The policy is trained by ordinary RLDP fine-tuning runs (same loop, mechanism, noise and budget
pacing as a private run, so it sees the same kind of observations) on the prepared ``public``
split: passages with no private record in them. Everything the saved policy has seen is thus
public; a private run that starts from it and keeps learning from its own DP releases and
held-out validation loss is post-processing of those, and spends nothing more than a cold start.
The file carries its provenance (data, its hash, episodes, epsilon, code version), which the
private run records as MLflow tags (``rldp.warm_start.*``).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from privtune import io
from privtune.config import BASE_DIR, PREPARED_DIR, Params
from privtune.data.tokenization import encode_records
from privtune.modeling import attach_lora, load_pretrained
from privtune.stages.common import resolved_max_length
from privtune.tracking import git_commit

PUBLIC_SPLIT = PREPARED_DIR / "public.jsonl"


def train_public_policy(
    params: Params,
    root: Path,
    out: Path,
    *,
    options: dict[str, Any],
    n_records: int,
    epsilon: float,
    epochs: float,
    episodes: int = 1,
    seed: int = 1000,
) -> Path:
    """Train the policy over ``episodes`` runs on disjoint public subsets of ``n_records``
    (the private train split's size, so q and the steps match), each continuing the last;
    save it with its provenance to ``out`` and return it."""
    from privtune.train import train

    path = root / PUBLIC_SPLIT
    records = [r["text"] for r in io.read_jsonl(path)]
    n_valid = 64
    if len(records) < n_valid + n_records:
        raise ValueError(f"{len(records)} public records are too few for {n_records} a run")
    episodes = min(episodes, (len(records) - n_valid) // n_records)
    _, tokenizer = load_pretrained(root / BASE_DIR, field=str(root / BASE_DIR))
    length = resolved_max_length(params, root)
    valid = encode_records(records[-n_valid:], tokenizer, length)
    warm: str | None = None
    out.parent.mkdir(parents=True, exist_ok=True)
    provenance = {
        "data": "public",
        "data_file": str(PUBLIC_SPLIT),
        "data_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "records_per_episode": n_records,
        "episodes": episodes,
        "epsilon": epsilon,
        "epochs": epochs,
        "seed": seed,
        "git_commit": git_commit(root),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for episode in range(episodes):
        chunk = records[episode * n_records : (episode + 1) * n_records]
        model, _ = load_pretrained(root / BASE_DIR, field=str(root / BASE_DIR))
        update = {"epsilon": epsilon, "seed": seed + episode, "epochs": epochs}
        # public records: nothing to keep secret, and the policy's provenance names its seed
        f = params.finetune.model_copy(
            update={**update, "audit_canaries": 0, "secret_noise": False}
        )
        model = attach_lora(model, f.lora, seed=seed + episode)
        result = train(
            model,
            encode_records(chunk, tokenizer, length),
            valid,
            f,
            "rldp",
            {**options, "warm_start": warm},
            show_progress=False,
        )
        state = result.controller.state_dict()
        state["provenance"] = provenance | {"episodes_done": episode + 1}
        torch.save(state, out)
        warm = str(out)
    io.write_json(out.with_suffix(".json"), provenance)
    return out
