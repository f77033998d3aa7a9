"""The bad-input matrix: every bad parameter, method option, data file, model directory,
registry command and command-line flag a user may try stops with exit code 2 and one message
naming the field or file and the fix: no traceback, no new file under the project's output
folders, no MLflow run.

Cheap by construction: one tiny prepared project (conftest.tiny_project) copied per case, the
CLI's main() called in-process, and every case fails before training starts.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from privtune.cli import main
from privtune.errors import DataError
from tests.conftest import edit_params

OUTPUT_FOLDERS = ("data", "models", "metrics", "plots", "reports", ".privtune", "mlruns")
SECRET = "Zanzibar-7731 secret record"  # in bad records: must never reach a message


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    named: tuple[str, ...]  # what the message must name (field, file, value)
    setup: Callable[[Path], object] = lambda root: None
    marks: tuple = field(default=())


def params(drop: tuple[str, ...] = (), **sections) -> Callable[[Path], object]:
    return lambda root: edit_params(root, drop, **sections)


def source(name: str, content: bytes, **prepare) -> Callable[[Path], object]:
    """A data file in inputs/ that prepare.source points at."""

    def setup(root: Path) -> None:
        (root / "inputs").mkdir(exist_ok=True)
        (root / "inputs" / name).write_bytes(content)
        edit_params(root, prepare={"source": f"inputs/{name}", **prepare})

    return setup


def dataset(rows: list[dict] | None, **prepare) -> Callable[[Path], object]:
    """A `datasets` save_to_disk directory (None: an empty directory) as prepare.source."""

    def setup(root: Path) -> None:
        import datasets

        path = root / "inputs" / "ds"
        if rows is None:
            path.mkdir(parents=True)
        else:
            datasets.Dataset.from_list(rows).save_to_disk(str(path))
        edit_params(root, prepare={"source": "inputs/ds", **prepare})

    return setup


def model_dir(damage: Callable[[Path], object]) -> Callable[[Path], object]:
    """A copy of the tiny base in inputs/model, damaged, as base.source."""

    def setup(root: Path) -> None:
        shutil.copytree(root / "models" / "base", root / "inputs" / "model")
        damage(root / "inputs" / "model")
        edit_params(root, base={"source": "inputs/model"})

    return setup


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_header(path: Path) -> None:
    path.write_bytes((24).to_bytes(8, "little") + b'{"w": [1, 2, 3], "x"...}' + b"\0" * 64)


def damaged_adapter(root: Path) -> None:
    """models/dpsgd as a finished fine-tuning left it, but its adapter weights cut short."""
    adapter = root / "models" / "dpsgd" / "adapter"
    adapter.mkdir(parents=True)
    (root / "models" / "dpsgd" / "finetune.json").write_text("{}")
    shutil.copy(
        root / "models" / "base" / "model.safetensors", adapter / "adapter_model.safetensors"
    )
    truncate(adapter / "adapter_model.safetensors")


def finished_model(root: Path, finetune_json: str) -> None:
    """models/dpsgd with whole weights (the base's file stands in for the adapter's) and the
    given finetune.json."""
    adapter = root / "models" / "dpsgd" / "adapter"
    adapter.mkdir(parents=True)
    (root / "models" / "dpsgd" / "finetune.json").write_text(finetune_json)
    shutil.copy(
        root / "models" / "base" / "model.safetensors", adapter / "adapter_model.safetensors"
    )


def empty_store(root: Path) -> None:
    """The project's MLflow store, made and migrated, with nothing registered in it."""
    import mlflow

    mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db").search_experiments(max_results=1)


def notes(n: int) -> list[dict]:
    return [{"text": f"note {i}: patient with cough, plan follow up"} for i in range(n)]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def csv_text(rows: list[str]) -> bytes:
    return ("text\n" + "".join(f"{r}\n" for r in rows)).encode()


FT = ("finetune", "dpsgd")
no_cuda = pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks a machine without CUDA"
)

CASES = [
    # -- params.yaml: refused when loaded ------------------------------------------------------
    Case("epsilon-zero", FT, ("finetune.epsilon",), params(finetune={"epsilon": 0})),
    Case("epsilon-negative", FT, ("finetune.epsilon", "-1"), params(finetune={"epsilon": -1})),
    Case("delta-above-one", FT, ("finetune.delta",), params(finetune={"delta": 2})),
    Case("batch-size-zero", FT, ("finetune.batch_size",), params(finetune={"batch_size": 0})),
    Case("epochs-zero", FT, ("finetune.epochs",), params(finetune={"epochs": 0})),
    Case("lr-negative", FT, ("finetune.lr",), params(finetune={"lr": -0.1})),
    Case("accountant", FT, ("finetune.accountant", "gdp"), params(finetune={"accountant": "gdp"})),
    Case("precision", FT, ("finetune.precision", "fp16"), params(finetune={"precision": "fp16"})),
    Case("lora-r-zero", FT, ("finetune.lora.r",), params(finetune={"lora": {"r": 0}})),
    Case("lora-unknown-key", FT, ("finetune.lora.rank",), params(finetune={"lora": {"rank": 4}})),
    Case("typo-section", FT, ("finetuning",), params(finetuning={"epsilon": 1})),
    Case(
        "typo-key",
        FT,
        ("finetune.epsilonn", "did you mean `finetune.epsilon`?"),
        params(finetune={"epsilonn": 1}),
    ),
    Case(
        "typo-option",
        FT,
        ("did you mean `methods.dpsgd.clip`?",),
        params(methods={"dpsgd": {"clipp": 1.0}}),
    ),
    Case("finetune-section-missing", FT, ("finetune", "section missing"), params(("finetune",))),
    Case("methods-section-missing", FT, ("methods", "section missing"), params(("methods",))),
    Case("prepare-section-missing", ("prepare",), ("prepare", "missing"), params(("prepare",))),
    Case("base-n-layer", ("base",), ("base.n_layer",), params(base={"n_layer": 0})),
    Case("base-max-length", ("base",), ("base.max_length",), params(base={"max_length": "x"})),
    Case(
        "base-renamed-key",
        ("base",),
        ("base.pretrained_path",),
        params(base={"pretrained_path": "m"}),
    ),
    Case(
        "valid-fraction",
        ("prepare",),
        ("prepare.valid_fraction",),
        params(prepare={"valid_fraction": 0.9}),
    ),
    Case(
        "max-record-chars-zero",
        ("prepare",),
        ("prepare.max_record_chars",),
        params(prepare={"max_record_chars": 0}),
    ),
    Case("attack-members", ("attack", "dpsgd"), ("attack.members",), params(attack={"members": 1})),
    Case(
        "evaluate-batch",
        ("evaluate", "dpsgd"),
        ("evaluate.batch_size",),
        params(evaluate={"batch_size": 0}),
    ),
    Case(
        "gate-auc",
        ("promote",),
        ("registry.gates.max_mia_auc",),
        params(registry={"gates": {"max_mia_auc": 0.2}}),
    ),
    Case(
        "params-not-yaml",
        FT,
        ("params.yaml", "not valid YAML"),
        lambda root: (root / "params.yaml").write_text("finetune: [unclosed\n"),
    ),
    Case(
        "params-not-mapping",
        FT,
        ("params.yaml", "mapping"),
        lambda root: (root / "params.yaml").write_text("- 1\n- 2\n"),
    ),
    # -- each method's options: typed per controller, refused when loaded ----------------------
    Case(
        "dpsgd-unknown-option",
        FT,
        ("methods.dpsgd.clipp", "options: method, clip"),
        params(methods={"dpsgd": {"clipp": 1.0}}),
    ),
    Case(
        "dpsgd-clip-zero",
        FT,
        ("methods.dpsgd.clip", "greater than 0"),
        params(methods={"dpsgd": {"clip": 0}}),
    ),
    Case(
        "per-adapter-weights",
        ("finetune", "per_adapter"),
        ("methods.per_adapter.weights",),
        params(methods={"per_adapter": {"weights": [-1.0]}}),
    ),
    Case(
        "quantile-target",
        ("finetune", "quantile"),
        ("methods.quantile.target_quantile", "1.5"),
        params(methods={"quantile": {"target_quantile": 1.5}}),
    ),
    Case(
        "quantile-interval",
        ("finetune", "quantile"),
        ("methods.quantile.interval",),
        params(methods={"quantile": {"interval": 0}}),
    ),
    Case(
        "auto-s-gamma",
        ("finetune", "auto_s"),
        ("methods.auto_s.gamma",),
        params(methods={"auto_s": {"gamma": 0}}),
    ),
    Case("psac-r", ("finetune", "psac"), ("methods.psac.r",), params(methods={"psac": {"r": -1}})),
    Case(
        "decay-schedule",
        ("finetune", "decay"),
        ("methods.decay.schedule", "cosine"),
        params(methods={"decay": {"schedule": "cosine"}}),
    ),
    Case(
        "decay-phases",
        ("finetune", "decay"),
        ("methods.decay.phases",),
        params(methods={"decay": {"phases": 0}}),
    ),
    Case(
        "lmo-grid",
        ("finetune", "lmo"),
        ("methods.lmo.grid", "huge"),
        params(methods={"lmo": {"grid": "huge"}}),
    ),
    Case(
        "rldp-interval-zero",
        ("finetune", "rldp"),
        ("methods.rldp.rl_interval", "greater than or equal to 1"),
        params(methods={"rldp": {"rl_interval": 0}}),
    ),
    Case(
        "rldp-bounds",
        ("finetune", "rldp"),
        ("methods.rldp.clip_bounds",),
        params(methods={"rldp": {"clip_bounds": [1.0]}}),
    ),
    Case(
        "nonprivate-option",
        ("finetune", "nonprivate"),
        ("methods.nonprivate.clip",),
        params(methods={"nonprivate": {"clip": 1.0}}),
    ),
    Case(
        "unknown-method-type",
        ("finetune", "mine"),
        ("methods.mine", "magic"),
        params(methods={"mine": {"method": "magic"}}),
    ),
    Case("unknown-entry", ("finetune", "nosuch"), ("methods.nosuch",)),
    Case("device-unknown", FT, ("finetune.device", "tpu9"), params(finetune={"device": "tpu9"})),
    # -- refused when the stage starts, before an MLflow run or a file ------------------------
    Case(
        "device-cuda",
        FT,
        ("finetune.device", "CUDA"),
        params(finetune={"device": "cuda"}),
        (no_cuda,),
    ),
    Case(
        "base-device-cuda",
        ("base",),
        ("base.device", "CUDA"),
        params(base={"device": "cuda"}),
        (no_cuda,),
    ),
    Case(
        "batch-above-n",
        FT,
        ("finetune.batch_size", "10000"),
        params(finetune={"batch_size": 10000}),
    ),
    Case(
        "epsilon-out-of-reach",  # RDP certifies nothing this small: opacus' ValueError, exit 5
        FT,
        ("finetune.epsilon", "rdp accountant cannot certify", "finetune.accountant: pld"),
        params(finetune={"epsilon": 0.01, "accountant": "rdp"}),
    ),
    Case(
        "epsilon-beyond-the-guard",  # PLD certifies it, at z ~ 3e3: the guard admits no step
        FT,
        ("finetune.epsilon", "above the 1000 the budget guard admits", "raise finetune.epsilon"),
        params(finetune={"epsilon": 0.0001}),
    ),
    Case(
        "lmo-epsilon-out-of-reach",  # no law of the paper's grid: found before the model loads
        ("finetune", "lmo"),
        ("finetune.epsilon", "no LMO-DP candidate", "grid: extended"),
        params(finetune={"epsilon": 0.3}, methods={"lmo": {"grid": "paper"}}),
    ),
    Case(
        "delta-above-one-over-n",
        FT,
        ("finetune.delta", "below 1/N"),
        params(finetune={"delta": 0.05}),
    ),
    Case(
        "lora-targets",
        FT,
        ("finetune.lora.target_modules", "nosuch"),
        params(finetune={"lora": {"target_modules": ["nosuch"]}}),
    ),
    # -- data files: JSONL, CSV and datasets directories ---------------------------------------
    Case(
        "jsonl-not-utf8",
        ("prepare",),
        ("in.jsonl", "UTF-8", "line 2, byte offset"),
        source("in.jsonl", jsonl(notes(1)) + b'{"text": "caf\xe9 ' + SECRET.encode() + b'"}\n'),
    ),
    Case(
        "csv-not-utf8",
        ("prepare",),
        ("in.csv", "UTF-8", "line 3, byte offset"),
        source("in.csv", csv_text(["a note"]) + b"caf\xe9 " + SECRET.encode() + b"\n"),
    ),
    Case(
        "csv-field-over-limit",
        ("prepare",),
        ("in.csv", "prepare.max_record_chars", "record 2"),
        source("in.csv", csv_text(["a note", SECRET + "x" * 200_000])),
    ),
    Case(
        "jsonl-record-too-long",
        ("prepare",),
        ("in.jsonl", "record 3", "prepare.max_record_chars = 500"),
        source(
            "in.jsonl", jsonl([*notes(2), {"text": SECRET * 40}, *notes(30)]), max_record_chars=500
        ),
    ),
    Case(
        "csv-record-too-long",
        ("prepare",),
        ("in.csv", "prepare.max_record_chars = 500"),
        source("in.csv", csv_text([SECRET * 40]), max_record_chars=500),
    ),
    Case(
        "jsonl-invalid",
        ("prepare",),
        ("in.jsonl", "line 2 is not valid JSON"),
        source("in.jsonl", jsonl(notes(1)) + b"{" + SECRET.encode() + b"\n"),
    ),
    Case(
        "jsonl-no-text",
        ("prepare",),
        ("in.jsonl", "no `text` column"),
        source("in.jsonl", jsonl([{"body": SECRET}] * 40)),
    ),
    Case("jsonl-empty", ("prepare",), ("in.jsonl", "empty"), source("in.jsonl", b"")),
    Case(
        "csv-no-text",
        ("prepare",),
        ("in.csv", "no `text` column"),
        source("in.csv", b"body\n" + SECRET.encode() + b"\n"),
    ),
    Case(
        "csv-empty-text",
        ("prepare",),
        ("in.csv", "record 2 has an empty"),
        source("in.csv", b"text,label\n" + SECRET.encode() + b",1\n,0\n"),
    ),
    Case(
        "too-few-records",
        ("prepare",),
        ("prepare.source", "too few"),
        source("in.jsonl", jsonl(notes(3))),
    ),
    Case(
        "source-missing",
        ("prepare",),
        ("prepare.source", "does not exist"),
        params(prepare={"source": "inputs/nope.jsonl"}),
    ),
    Case(
        "source-parquet",
        ("prepare",),
        ("prepare.source", ".parquet"),
        source("in.parquet", b"PAR1"),
    ),
    Case(
        "dataset-no-text",
        ("prepare",),
        ("inputs/ds", "no `text` column"),
        dataset([{"body": SECRET}] * 40),
    ),
    Case("dataset-not-a-dataset", ("prepare",), ("inputs/ds", "save_to_disk"), dataset(None)),
    Case(
        "dataset-record-too-long",
        ("prepare",),
        ("inputs/ds", "prepare.max_record_chars = 500"),
        dataset([*notes(30), {"text": SECRET * 40}], max_record_chars=500),
    ),
    # -- model directories -------------------------------------------------------------------
    Case(
        "model-source-missing",
        ("base",),
        ("base.source", "no/such/dir"),
        params(base={"source": "no/such/dir"}),
    ),
    Case(
        "model-no-config",
        ("base",),
        ("base.source", "no config.json"),
        model_dir(lambda d: (d / "config.json").unlink()),
    ),
    Case(
        "model-config-corrupt",
        ("base",),
        ("base.source", "config.json is corrupt"),
        model_dir(lambda d: (d / "config.json").write_text("{")),
    ),
    Case(
        "model-no-weights",
        ("base",),
        ("base.source", "no weights"),
        model_dir(lambda d: (d / "model.safetensors").unlink()),
    ),
    Case(
        "model-truncated",
        ("base",),
        ("base.source", "model.safetensors is truncated"),
        model_dir(lambda d: truncate(d / "model.safetensors")),
    ),
    Case(
        "model-corrupt",
        ("base",),
        ("base.source", "model.safetensors is corrupt"),
        model_dir(lambda d: corrupt_header(d / "model.safetensors")),
    ),
    Case(
        "adapter-truncated-evaluate",
        ("evaluate", "dpsgd"),
        ("models/dpsgd", "adapter_model.safetensors is truncated"),
        damaged_adapter,
    ),
    Case(
        "adapter-truncated-attack",
        ("attack", "dpsgd"),
        ("models/dpsgd", "adapter_model.safetensors is truncated"),
        damaged_adapter,
    ),
    Case(
        "prepared-split-truncated",
        FT,
        ("train.jsonl", "unreadable (JSONDecodeError)", "dvc repro prepare"),
        lambda root: truncate(root / "data/prepared/train.jsonl"),
    ),
    Case(
        "data-card-without-hash",
        FT,
        ("data_card.json", "unreadable (KeyError)", "dvc repro prepare"),
        lambda root: (root / "data/prepared/data_card.json").write_text("{}"),
    ),
    Case(
        "base-info-truncated",
        FT,
        ("privtune.json", "unreadable (JSONDecodeError)", "dvc repro base"),
        lambda root: (
            truncate(root / "models/base/privtune.json")
            or edit_params(root, base={"max_length": "auto"})
        ),
    ),
    Case(
        "finetune-info-truncated-evaluate",
        ("evaluate", "dpsgd"),
        ("finetune.json", "unreadable (JSONDecodeError)", "dvc repro finetune@dpsgd"),
        lambda root: finished_model(root, finetune_json="{"),
    ),
    Case(
        "base-output-truncated",
        FT,
        ("models/base", "model.safetensors is truncated"),
        lambda root: truncate(root / "models/base/model.safetensors"),
    ),
    Case(
        "metrics-truncated-summary",
        ("summary",),
        ("evaluate-dpsgd.json", "unreadable (JSONDecodeError)", "dvc repro evaluate@dpsgd"),
        lambda root: (
            (root / "metrics").mkdir(exist_ok=True)
            or (root / "metrics" / "evaluate-dpsgd.json").write_text('{"test_perplexity": ')
        ),
    ),
    # -- registry commands -------------------------------------------------------------------
    Case(
        "promote-version-99",
        ("promote", "--version", "99"),
        ("--version", "no version 99"),
        empty_store,
    ),
    Case(
        "promote-version-abc",
        ("promote", "--version", "abc"),
        ("--version", "'abc'", "positive integer"),
    ),
    Case("promote-version-zero", ("promote", "--version", "0"), ("--version", "positive integer")),
    Case(
        "promote-nothing-registered",
        ("promote",),
        ("challenger", "register a model first"),
        empty_store,
    ),
    Case("rollback-nothing-registered", ("rollback",), ("no such registered model",), empty_store),
    # no store at all: said without creating one (or its directory, or the registry's lock)
    Case("promote-no-store", ("promote",), ("--root", "no MLflow store", "dvc repro")),
    Case("rollback-no-store", ("rollback",), ("--root", "no MLflow store", "dvc repro")),
    # -- command-line flags ------------------------------------------------------------------
    Case("params-file-missing", ("--params", "nope.yaml", *FT), ("nope.yaml", "not found")),
    Case("root-missing", ("--root", "no/such/root", *FT), ("--root", "no/such/root")),
    Case("unknown-command", ("train",), ("invalid choice: 'train'",)),
    Case("finetune-without-entry", ("finetune",), ("name",)),
    Case("evaluate-before-finetune", ("evaluate", "dpsgd"), ("models/dpsgd", "finetune@dpsgd")),
]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _outputs(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for folder in OUTPUT_FOLDERS
        if (root / folder).exists()
        for p in (root / folder).rglob("*")
    )


def _mlflow_runs(root: Path) -> int:
    if not (root / "mlflow.db").exists():
        return 0
    with sqlite3.connect(root / "mlflow.db") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0


@pytest.fixture(autouse=True)
def _own_store(monkeypatch):
    """Each case's project's own MLflow store, whatever an earlier test left in the env."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 45 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_exits_2_naming_the_field_and_leaving_nothing(
    case, tiny_project, tmp_path, capsys, monkeypatch
):
    root = tmp_path / "project"
    shutil.copytree(tiny_project, root)
    case.setup(root)
    before, runs = _outputs(root), _mlflow_runs(root)
    monkeypatch.chdir(root)  # --params is relative to the current directory
    argv = list(case.argv)
    if "--root" not in argv:
        argv = ["--root", str(root), *argv]
    files = _files(root)
    code = main(["--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    if case.id.endswith("-no-store"):
        assert _files(root) == files  # no mlflow.db, no mlflow.registry.lock
    for name in case.named:
        assert name in err, f"{name!r} not in: {err}"
    assert "Traceback" not in err and SECRET not in err
    assert err.count("Fix:") <= 1  # one message
    assert _outputs(root) == before  # nothing new under data/, models/, metrics/, plots/...
    assert _mlflow_runs(root) == runs == 0


def test_params_path_is_relative_to_the_current_directory(
    tiny_project, tmp_path, monkeypatch, capsys
):
    """`--params` is a shell path (cwd); without it, the project's own params.yaml."""
    root = tmp_path / "project"
    shutil.copytree(tiny_project, root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(root / "params.yaml", elsewhere / "params.yaml")
    monkeypatch.chdir(elsewhere)
    assert main(["--root", str(root), "--params", "params.yaml", "summary"]) == 0
    assert main(["--root", str(root), "summary"]) == 2  # <root>/params.yaml is not there
    capsys.readouterr()
    edit_params(elsewhere, finetune={"epsilon": -1.0})
    monkeypatch.chdir(root)  # a "../" is named the way a reader finds the file
    assert main(["--root", ".", "--params", "../elsewhere/params.yaml", "check"]) == 2
    err = capsys.readouterr().err
    assert f"in {elsewhere / 'params.yaml'}" in err and "../" not in err


@pytest.mark.parametrize(
    ("raised", "code", "says"),
    [
        (RuntimeError("boom"), 5, "unexpected error (RuntimeError): this is a bug"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_unexpected_errors_exit_5_and_interrupts_130(
    raised, code, says, tiny_project, tmp_path, capsys, monkeypatch
):
    """Exit 1 stays a gate refusal and 2 bad input: a bug is 5, with the traceback to report."""
    import privtune.stages.prepare as stage

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(stage, "prepare", fail)
    assert main(["--root", str(tiny_project), "--no-progress", "prepare"]) == code
    err = capsys.readouterr().err
    assert says in err
    assert ("Traceback" in err) == (code == 5)


def test_a_damaged_prepared_file_is_a_data_error_naming_it_and_the_rebuild(tiny_project, tmp_path):
    """A canaries file cut short (or hand-edited) was a crash (exit 5, which schedulers retry)."""
    from privtune.config import load_params
    from privtune.stages import attack

    root = tmp_path / "project"
    shutil.copytree(tiny_project, root)
    canaries = root / "data" / "prepared" / "canaries.json"
    canaries.write_text(canaries.read_text()[:40])
    expected = (
        r"canaries\.json: unreadable \(JSONDecodeError\)\. Fix: rebuild it: `dvc repro prepare`"
    )
    with pytest.raises(DataError, match=expected):
        attack.membership_sets(root, load_params(root / "params.yaml").attack)
