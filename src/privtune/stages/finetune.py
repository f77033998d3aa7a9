"""Stage `finetune@<name>`: LoRA fine-tuning with one method, tracked in MLflow."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from privtune import io
from privtune.config import BASE_DIR, METRICS_DIR, MODELS_DIR, PLOTS_DIR, Params
from privtune.stages.common import data_hash, load_base, read_split


def finetune(
    params: Params, name: str, root: Path = Path("."), show_progress: bool = True
) -> dict[str, Any]:
    """Fine-tune LoRA adapters with method `name`; log everything to MLflow."""
    from privtune import tracking
    from privtune.control.registry import controller_class
    from privtune.data.tokenization import encode_records
    from privtune.modeling import attach_lora
    from privtune.plots import plot_training
    from privtune.train import make_plan, train

    method, options = params.method(name)
    private = controller_class(method, name).private  # fail fast on an unknown method
    f = params.finetune
    model, tokenizer = load_base(root)
    max_length = params.base.max_length
    train_data = encode_records(
        [r["text"] for r in read_split(root, "train")], tokenizer, max_length
    )
    valid_data = encode_records(
        [r["text"] for r in read_split(root, "valid")], tokenizer, max_length
    )
    model = attach_lora(model, f.lora, seed=f.seed)
    plan = make_plan(len(train_data), f, private)  # validates delta before anything is written

    with tracking.start_run(run_name=name, root=root) as run:
        run.set_tags({"stage": "finetune", "method": method, "entry": name})
        run.log_params(
            {
                "method": method,
                "entry": name,
                "method_options": options,
                "finetune": f.model_dump(),
                "base": params.base.model_dump(),
                "data_sha256": data_hash(root),
                "git_commit": tracking.git_commit(root),
                "n_train_records": len(train_data),
                "sample_rate": plan.sample_rate,
                "steps": plan.steps,
                "delta": plan.delta,
                "noise_multiplier": plan.calibrated_noise,
            }
        )
        result = train(
            model,
            train_data,
            valid_data,
            f,
            method,
            options,
            entry=name,
            plan=plan,
            on_log=run.log_metrics,
            show_progress=show_progress,
        )
        metrics: dict[str, Any] = {
            "method": method,
            "private": result.ledger is not None,
            "steps": result.steps_taken,
            "sample_rate": plan.sample_rate,
            "valid_perplexity": math.exp(result.valid_loss),
            "stopped_by_guard": result.stopped_by_guard,
        }
        if result.ledger is not None:
            metrics |= {
                "target_epsilon": f.epsilon,
                "epsilon": result.epsilon,
                "epsilon_rdp": result.epsilon_rdp,
                "delta": plan.delta,
                "noise_multiplier": plan.calibrated_noise,
                "accountant": f.accountant,
            }
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})

        with io.atomic_dir(root / MODELS_DIR / name) as out:
            model.save_pretrained(out / "adapter")
            if result.ledger is not None:
                result.ledger.save(out / "ledger.json")
            torch.save(result.controller.state_dict(), out / "controller.pt")
            io.write_json(
                out / "finetune.json",
                {
                    "entry": name,
                    "method": method,
                    "options": options,
                    "base": str(BASE_DIR),
                    "run_id": run.run_id,
                    "plan": dataclasses.asdict(plan),
                    "finetune": f.model_dump(),
                    "metrics": metrics,
                },
            )
            run.log_artifact(out / "adapter", "adapter")
            if result.ledger is not None:
                run.log_artifact(out / "ledger.json")
        figure = plot_training(result.history, f.epsilon, root / PLOTS_DIR / f"finetune-{name}.png")
        run.log_artifact(figure)
    _write_history(root / PLOTS_DIR / f"finetune-{name}.csv", result.history)
    io.write_json(root / METRICS_DIR / f"finetune-{name}.json", metrics)
    return metrics


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    columns = ["step", "loss", "valid_loss", "epsilon", "noise_multiplier"]
    with io.atomic_file(path) as handle:
        handle.write(",".join(columns) + "\n")
        for row in history:
            handle.write(",".join("" if row.get(c) is None else f"{row[c]:.6g}" for c in columns))
            handle.write("\n")
