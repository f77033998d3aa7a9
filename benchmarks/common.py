"""What the utility benchmarks share: the project's data and base model, one fine-tuning run
through the one training loop, and the reduced project of --quick.

Benchmarks run methods side by side in one process on the same data, base and step budget, so
their ratios are measured under the same machine load (these machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privtune import io
from privtune.config import BASE_DIR, PREPARED_DIR, Params, load_params, method_options
from privtune.data.tokenization import EncodedRecords, encode_records
from privtune.evaluate import evaluate_scored
from privtune.modeling import adapter_groups, attach_lora, load_pretrained
from privtune.stages.common import resolved_max_length
from privtune.train import TrainResult, train

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
# what a run's numbers depend on besides its options: the library and these benchmark helpers
SOURCE_PATHS = ("src", "benchmarks/common.py")
# --quick: the pipeline at a size that runs in minutes on a busy 2-core machine.
QUICK = {
    "prepare": {"n_private": 480, "n_public": 600},
    "base": {"vocab_size": 1024, "n_layer": 1, "n_head": 2, "n_embd": 64, "max_length": 96,
             "steps": 150, "batch_size": 16},
    "finetune": {"batch_size": 16, "epochs": 1.0, "eval_every": 1000, "log_every": 1000,
                 "eval_records": 16, "lora": {"r": 4}},
}  # fmt: skip


def quick_params(params: Params) -> Params:
    sections = {
        name: getattr(params, name).model_copy(update=values) for name, values in QUICK.items()
    }
    lora = params.finetune.lora.model_copy(update=QUICK["finetune"]["lora"])
    sections["finetune"] = sections["finetune"].model_copy(update={"lora": lora})
    return params.model_copy(update=sections)


def ensure_project(params: Params, root: Path, quick: bool) -> Path:
    """The project root holding a base model and prepared data. With --quick, a reduced
    project of its own (the pipeline's prepare and base stages at the QUICK size), built once
    under benchmarks/results/quick-project and reused, so reduced runs never mix the reduced
    parameters with the full project's base model."""
    if quick:
        root = RESULTS / "quick-project"
    if (root / BASE_DIR).is_dir() and (root / PREPARED_DIR / "train.jsonl").is_file():
        return root
    if not quick:
        raise SystemExit(f"no base model under {root}: run `dvc repro base` or pass --quick")
    from privtune.stages.base import base
    from privtune.stages.prepare import prepare

    print(f"building a reduced project in {root} (prepare, base)", flush=True)
    prepare(params, root)
    base(params, root, show_progress=False)
    return root


def build_profile_project(root: Path, profile: str) -> Path:
    """profiles/<profile>/ of the checkout at `root` with its prepare and base stages done
    (a GGUF base converted once)."""
    from privtune.profiles import project, repro

    target = project(root, profile, None)
    if repro(target, "base"):
        raise SystemExit(f"`dvc repro base` failed in {target}")
    return target


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark on a profile's SmolLM2 project (profiles.yaml)."""
    parser.add_argument("--root", type=Path, default=Path("."), help="the checkout")
    parser.add_argument("--profile", default="smollm2-cpu-attacks")
    parser.add_argument("--epochs", type=float, help="passes over the data (the profile's)")
    parser.add_argument("--seed", type=int, default=0)
    # records per forward/backward: bounds a DP step's memory (the ledger and update are equal)
    parser.add_argument("--physical-batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)


def open_profile(args: argparse.Namespace) -> tuple[Params, Path, Data]:
    """(params, project root, encoded data) of the parsed profile; the output folder exists."""
    root = build_profile_project(args.root.resolve(), args.profile)
    params = load_params(root / "params.yaml")
    args.out.mkdir(parents=True, exist_ok=True)
    return params, root, load_data(params, root)


def add_project_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every utility benchmark takes: where the project is, its size, the output."""
    parser.add_argument("--root", type=Path, default=Path("."), help="project root")
    parser.add_argument("--quick", action="store_true", help="reduced size (common.QUICK)")
    parser.add_argument("--profile", help="a profile's project instead (profiles.yaml), e.g. "
                        "smollm2-cpu: built under profiles/<name>/ up to its base")  # fmt: skip
    parser.add_argument("--epochs", type=float, help="passes over the data (finetune.epochs)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """The epsilon grid and the seeds a side-by-side comparison runs over."""
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])


def open_project(args: argparse.Namespace) -> tuple[Params, Path, Data]:
    """(params, project root, encoded data) for the parsed options; the output folder exists."""
    if args.profile:
        if args.quick:
            raise SystemExit("--quick and --profile are two project sizes: give one")
        root = build_profile_project(args.root.resolve(), args.profile)
        params = load_params(root / "params.yaml")
    else:
        params = load_params(args.root / "params.yaml")
        if args.quick:
            params = quick_params(params)
        root = ensure_project(params, args.root, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    return params, root, load_data(params, root)


@dataclass
class Data:
    train: EncodedRecords
    valid: EncodedRecords
    test_records: list[dict]


def load_data(params: Params, root: Path) -> Data:
    _, tokenizer = load_pretrained(root / BASE_DIR, field=str(root / BASE_DIR))
    split = {
        n: io.read_jsonl(root / PREPARED_DIR / f"{n}.jsonl") for n in ("train", "valid", "test")
    }
    length = resolved_max_length(params, root)
    return Data(
        encode_records([r["text"] for r in split["train"]], tokenizer, length),
        encode_records([r["text"] for r in split["valid"]], tokenizer, length),
        split["test"][: params.evaluate.max_records],  # the test notes the evaluate stage scores
    )


def source_version(repo: Path = REPO) -> dict[str, Any]:
    """The code a run ran: the commit, git's hashes of SOURCE_PATHS at it, and whether they had
    uncommitted changes. --reuse compares the hashes, so a behaviour change that kept every
    option (the DP norm histogram's cap did) is not taken for today's code; a dirty tree's runs
    are never reused. Git, not a hash of our own: it already hashes exactly the tracked files."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    paths = {path: git("rev-parse", f"HEAD:{path}") or None for path in SOURCE_PATHS}
    return {
        "commit": git("rev-parse", "HEAD") or None,
        "paths": paths,
        "dirty": bool(git("status", "--porcelain", "--", *SOURCE_PATHS)),
    }


def same_source(run: dict[str, Any], today: dict[str, Any]) -> bool:
    """Whether an earlier run ran today's code: the same committed hashes, neither dirty."""
    earlier = run.get("source")
    if not earlier or earlier.get("dirty") or today.get("dirty"):
        return False
    return None not in today["paths"].values() and earlier.get("paths") == today["paths"]


def resolved_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options a run actually used, defaults filled in: what --reuse must compare, since a
    changed default changes a run whose options, as written, did not."""
    return method_options(method, options, method).model_dump(mode="json")


def run_method(
    params: Params,
    root: Path,
    method: str,
    options: dict[str, Any],
    data: Data,
    *,
    epsilon: float,
    seed: int,
    eval_every: int = 10,
    entry: str | None = None,
    epochs: float | None = None,
    downstream: bool = True,
) -> tuple[dict[str, Any], TrainResult]:
    """Fine-tune the base with one method at (epsilon, seed): a row of utility, spending and
    time (JSON-ready), and the loop's result (ledger, controller).

    The white-box audit's gradient canaries are left out: a benchmark compares methods, and
    canaries would only add the same records to every side. ``downstream=False`` skips the
    downstream task (scoring every drug of the formulary costs about as much as the training
    run at this size) where only perplexity is compared.
    """
    source = source_version()  # the code as the run starts; checked again as it ends
    model, tokenizer = load_pretrained(root / BASE_DIR, field=str(root / BASE_DIR))
    update = {"epsilon": epsilon, "seed": seed, "eval_every": eval_every, "audit_canaries": 0}
    update["secret_noise"] = False  # paired: at one seed every method gets the same batches, noise
    if epochs is not None:
        update["epochs"] = epochs
    f = params.finetune.model_copy(update=update)
    model = attach_lora(model, f.lora, seed=seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapters = len(adapter_groups(model, "per_adapter")[0])
    start, cpu = time.perf_counter(), time.process_time()
    result = train(
        model, data.train, data.valid, f, method, options, entry=entry, show_progress=False
    )
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    task = None if downstream else params.evaluate.model_copy(update={"task": None})
    length = resolved_max_length(params, root)
    metrics, scores = evaluate_scored(model, tokenizer, data.test_records, length, task=task)
    curve = [(r["step"], r["valid_loss"]) for r in result.history if "valid_loss" in r]
    row = {
        "method": method,
        "entry": entry or method,
        "options": options,
        "resolved_options": resolved_options(method, options),
        # a commit during the run leaves it of neither version: never reused
        "source": source if source_version() == source else {**source, "dirty": True},
        "epsilon": epsilon,
        "seed": seed,
        "epochs": epochs,
        "epsilon_spent": result.epsilon,
        "delta": result.plan.delta,
        "sample_rate": result.plan.sample_rate,
        "steps": result.steps_taken,
        "trainable_parameters": trainable,
        "adapters": adapters,
        "valid_perplexity": math.exp(result.valid_loss),
        "seconds_per_step": seconds / max(result.steps_taken, 1),
        # CPU time of this process: on a shared machine wall time follows the others' load
        "cpu_seconds_per_step": cpu / max(result.steps_taken, 1),
        # the step loop alone (decisions, steps, validation): the per-step cost of a method,
        # without the one-off calibration before it (cached on disk after the first run) and
        # the final accounting after it
        "loop_seconds_per_step": result.loop_seconds / max(result.steps_taken, 1),
        "loop_cpu_seconds_per_step": result.loop_cpu_seconds / max(result.steps_taken, 1),
        "decision_cpu_seconds_per_step": result.decision_cpu_seconds / max(result.steps_taken, 1),
        "curve": curve,
        "controller_metrics": result.controller.metrics() if result.controller else {},
        **metrics,
        # each test note's summed NLL and tokens (numbers only): a paired comparison of two
        # runs over the same notes (record_scores.paired_difference)
        "record_scores": {"test_perplexity": scores["test_perplexity"].to_dict()},
    }
    return row, result


def mean_spread(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, standard deviation, min, max); a single value has no spread."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.mean(values), sd, min(values), max(values)
