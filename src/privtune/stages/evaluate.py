"""Stage `evaluate@<name>`: utility of a fine-tuned model on the private test split.

The numbers reach the fine-tuning run in MLflow through the `register` stage, which logs every
method's evaluation and attack results in one process (MLflow's start-up is seconds a stage).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from privtune import io
from privtune.config import METRICS_DIR, Params
from privtune.errors import ModelError
from privtune.stages.common import (
    evaluated_split,
    fine_tuned_dir,
    load_base,
    read_input,
    read_split,
    resolved_max_length,
)


def task_train(params: Params, root: Path) -> list[dict]:
    """The train split where the task draws its candidates from it (cloze), else nothing."""
    return read_split(root, "train") if params.evaluate.task == "cloze" else []


def evaluated_on(
    test: list[dict],
    tokenizer: Any,
    max_length: int,
    params: Params,
    candidates: list[dict] | None = None,
) -> str:
    """What the utility numbers were measured on: the test records' texts, the tokenizer's
    vocabulary, max_length, the task's settings (not the batch size) and, for the cloze task,
    the train records its candidates come from. Two versions' numbers are comparable only
    when this matches (the promotion's utility gate)."""
    what = {
        "texts": [r["text"] for r in test],
        "candidates": [r["text"] for r in candidates or []],
        "vocabulary": sorted(tokenizer.get_vocab().items()),
        "max_length": max_length,
        "task": params.evaluate.model_dump(exclude={"batch_size", "max_records"}, mode="json"),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def evaluate(params: Params, name: str, root: Path = Path(".")) -> dict[str, Any]:
    """Utility of the fine-tuned model on the private test split (metrics/evaluate-<name>)."""
    from privtune.evaluate import evaluate_scored
    from privtune.modeling import load_adapter, resolve_device
    from privtune.record_scores import record_scores_path, write_scores

    params.method(name)
    model_dir, again = fine_tuned_dir(root, name)
    info = read_input(model_dir / "finetune.json", io.read_json, again, ModelError)
    model, tokenizer = load_base(root)
    model = load_adapter(model, model_dir / "adapter")
    model.to(resolve_device(params.finetune.device, "finetune.device"))
    test = evaluated_split(root, params)
    max_length, candidates = resolved_max_length(params, root), task_train(params, root)
    metrics, scores = evaluate_scored(
        model,
        tokenizer,
        test,
        max_length,
        params.evaluate.batch_size,
        task=params.evaluate,
        train_records=candidates,
    )
    metrics["evaluated_on"] = evaluated_on(test, tokenizer, max_length, params, candidates)
    metrics["method"] = info["method"]
    if "epsilon" in info["metrics"]:
        metrics["epsilon"] = info["metrics"]["epsilon"]
    # what a promotion resamples to compare two versions on these records (numbers, no text)
    write_scores(root / record_scores_path(name), metrics["evaluated_on"], scores)
    io.write_json(root / METRICS_DIR / f"evaluate-{name}.json", metrics)
    return metrics
