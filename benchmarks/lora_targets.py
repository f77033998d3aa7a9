"""Which projections of a Llama model LoRA should adapt: all seven (`target_modules: auto`) or
only `q_proj, v_proj` (the LoRA paper's choice), side by side on SmolLM2-135M.

Both choices fine-tune the same converted base on the same notes, with the same seed, step
budget and (ε, δ), non-privately and with DP-SGD, in one process (interleaved, so the machine's
load hits both alike). The report gives, per choice and method: trainable parameters and
adapters, test and validation perplexity, ε spent and the step loop's time per step.

The project is a profile's (profiles.yaml; default `smollm2-cpu-attacks`, 128-token notes, so a
step takes seconds on a CPU), built with its prepare and base stages in profiles/<name>/.

    python benchmarks/lora_targets.py [--profile smollm2-cpu-attacks] [--epochs 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_profile_arguments, open_profile, run_method  # noqa: E402
from privtune import io  # noqa: E402
from privtune.config import Params  # noqa: E402

CHOICES = {"all seven projections": "auto", "q_proj, v_proj": ["q_proj", "v_proj"]}


def with_targets(params: Params, targets: str | list[str], physical: int | None) -> Params:
    lora = params.finetune.lora.model_copy(update={"target_modules": targets})
    update = {"lora": lora}
    if physical:
        update["physical_batch_size"] = physical
    return params.model_copy(update={"finetune": params.finetune.model_copy(update=update)})


def markdown(runs: list[dict]) -> str:
    lines = [
        "| LoRA targets | method | trainable parameters | adapters | test ppl | valid ppl | "
        "ε spent | s / step (CPU) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        spent = "∞" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.2f}"
        lines.append(
            f"| {r['targets']} | {r['method']} | {r['trainable_parameters']:,} | "
            f"{r['adapters']} | {r['test_perplexity']:.2f} | {r['valid_perplexity']:.2f} | "
            f"{spent} | {r['loop_cpu_seconds_per_step']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=["nonprivate", "dpsgd"])
    args = parser.parse_args()
    params, root, data = open_profile(args)
    runs: list[dict] = []
    for entry in args.methods:
        method, options = params.method(entry)
        for label, targets in CHOICES.items():
            chosen = with_targets(params, targets, args.physical_batch_size)
            row, _ = run_method(
                chosen, root, method, dict(options), data, epsilon=params.finetune.epsilon,
                seed=args.seed, entry=entry, epochs=args.epochs, downstream=False,
            )  # fmt: skip
            row |= {"targets": label, "target_modules": targets}
            if method == "nonprivate":
                row["epsilon_spent"] = None
            runs.append(row)
            io.write_json(args.out / "lora_targets_runs.json", runs)  # partial results
            print(f"{label:>22} {entry:>10} ppl={row['test_perplexity']:.2f} "
                  f"{row['loop_cpu_seconds_per_step']:.1f} s/step", flush=True)  # fmt: skip
    table = markdown(runs)
    io.write_json(
        args.out / "lora_targets.json",
        {"profile": args.profile, "epochs": args.epochs or params.finetune.epochs,
         "seed": args.seed, "runs": runs},
    )  # fmt: skip
    with io.atomic_file(args.out / "lora_targets.md") as handle:
        handle.write(table)
    print(table)


if __name__ == "__main__":
    main()
