"""Bad input: each gives a clear error naming the field and the fix, exits non-zero, and
leaves no half-written output."""

import json
import shutil

import pytest

from privtune.cli import main
from tests.conftest import write_params


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project with prepared data and a base model (tiny), shared by the tests below."""
    root = tmp_path_factory.mktemp("project")
    write_params(root / "params.yaml")
    assert main(["--root", str(root), "--no-progress", "prepare"]) == 0
    assert main(["--root", str(root), "--no-progress", "base"]) == 0
    return root


def _run(root, *args, capsys):
    code = main(["--root", str(root), "--no-progress", *args])
    return code, capsys.readouterr().err


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("epsilon", [0, -2])
def test_non_positive_epsilon(project, capsys, epsilon, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(project, root)
    write_params(root / "params.yaml", finetune={"epsilon": epsilon})
    before = _listing(root)
    code, err = _run(root, "finetune", "dpsgd", capsys=capsys)
    assert code == 2 and "finetune.epsilon" in err and "Fix:" in err
    assert _listing(root) == before


def test_under_torchrun_rank_0_alone_says_a_bad_input(project, capsys, tmp_path, monkeypatch):
    """Every rank finds the same bad input: one message, not one per rank."""
    root = tmp_path / "p"
    shutil.copytree(project, root)
    write_params(root / "params.yaml", finetune={"epsilon": -1})
    monkeypatch.setenv("RANK", "1")
    assert _run(root, "finetune", "dpsgd", capsys=capsys) == (2, "")
    monkeypatch.setenv("RANK", "0")
    code, err = _run(root, "finetune", "dpsgd", capsys=capsys)
    assert code == 2 and "finetune.epsilon" in err


def test_delta_not_below_one_over_n(project, capsys, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(project, root)
    write_params(root / "params.yaml", finetune={"delta": 0.05})
    before = _listing(root)
    code, err = _run(root, "finetune", "dpsgd", capsys=capsys)
    assert code == 2 and "finetune.delta" in err and "below 1/N" in err
    assert _listing(root) == before  # no models/dpsgd, no metrics, no MLflow run


def test_delta_the_registry_gate_would_refuse_is_refused_before_training(project, capsys, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(project, root)
    write_params(root / "params.yaml", finetune={"delta": 5e-4})  # below 1/N, above the gate
    before = _listing(root)
    code, err = _run(root, "finetune", "dpsgd", capsys=capsys)
    assert code == 2 and "registry.gates.max_delta" in err and "at most 0.0001" in err
    assert _listing(root) == before


def test_unknown_method(project, capsys):
    code, err = _run(project, "finetune", "nosuch", capsys=capsys)
    assert code == 2 and "methods.nosuch" in err


def test_unknown_method_type(project, capsys, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(project, root)
    write_params(root / "params.yaml", methods={"mine": {"method": "magic"}})
    code, err = _run(root, "finetune", "mine", capsys=capsys)
    assert code == 2 and "unknown method 'magic'" in err and "dpsgd" in err
    assert not (root / "models" / "mine").exists()


def _bad_source(tmp_path, capsys, name, content):
    (tmp_path / name).write_text(content)
    write_params(tmp_path / "params.yaml", prepare={"source": name})
    code, err = _run(tmp_path, "prepare", capsys=capsys)
    assert code == 2
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.jsonl"))
    return err


def test_dataset_without_text_column(tmp_path, capsys):
    rows = "\n".join(json.dumps({"body": f"secret note {i}"}) for i in range(50))
    err = _bad_source(tmp_path, capsys, "notes.jsonl", rows)
    assert "no `text` column" in err and "secret note" not in err


def test_empty_dataset(tmp_path, capsys):
    err = _bad_source(tmp_path, capsys, "notes.csv", "text\n")
    assert "empty" in err


def test_missing_model_path(tmp_path, capsys, project):
    root = tmp_path / "p"
    shutil.copytree(project, root)
    shutil.rmtree(root / "models")
    write_params(root / "params.yaml", base={"source": "no/such/model"})
    code, err = _run(root, "base", capsys=capsys)
    assert code == 2 and "base.source" in err and "smollm2-135m" in err
    assert not (root / "models").exists()


def test_unreadable_model_path(tmp_path, capsys, project):
    root = tmp_path / "p"
    shutil.copytree(project, root)
    shutil.rmtree(root / "models")
    (root / "garbage").mkdir()
    (root / "garbage" / "config.json").write_text("not json")
    write_params(root / "params.yaml", base={"source": "garbage"})
    code, err = _run(root, "base", capsys=capsys)
    assert code == 2 and "base.source" in err and "config.json is corrupt" in err
    assert not (root / "models").exists()


def test_user_model_directory_skips_pretraining(tmp_path, capsys, project):
    """A local from_pretrained directory is loaded with its own tokenizer, not pretrained."""
    root = tmp_path / "p"
    shutil.copytree(project, root)
    shutil.copytree(project / "models" / "base", root / "mymodel")
    shutil.rmtree(root / "models")
    write_params(root / "params.yaml", base={"source": "mymodel", "steps": 10**6})
    code, _ = _run(root, "base", capsys=capsys)
    assert code == 0
    metrics = json.loads((root / "metrics" / "base.json").read_text())
    assert metrics["source"] == "mymodel" and "public_valid_perplexity" not in metrics


def test_attack_before_finetune_names_the_missing_stage(project, capsys):
    code, err = _run(project, "attack", "dpsgd", capsys=capsys)
    assert code == 2 and "fine-tuned model missing" in err and "finetune@dpsgd" in err


def test_audit_above_the_claimed_epsilon_fails_loudly(project, capsys, tmp_path, monkeypatch):
    """A bound above the claim means broken privacy code: exit 4, no metrics file to trust."""
    import privtune.attacks.run as attacks

    root = tmp_path / "p"
    shutil.copytree(project, root)
    assert _run(root, "finetune", "dpsgd", capsys=capsys)[0] == 0
    claimed = json.loads((root / "metrics/finetune-dpsgd.json").read_text())["epsilon"]
    monkeypatch.setattr(
        attacks,
        "run_attacks",
        lambda *args, **kwargs: ({"audit_epsilon_lower_bound": claimed + 0.5}, []),
    )
    code, err = _run(root, "attack", "dpsgd", capsys=capsys)
    assert code == 4 and "privacy audit violation" in err and "exceeds the claimed" in err
    assert not (root / "metrics/attack-dpsgd.json").exists()


def test_register_names_unknown_and_untrained_methods_and_registers_nothing(project, capsys):
    code, err = _run(project, "register", "dpsgd", "nosuch", capsys=capsys)
    assert code == 2 and "methods.nosuch" in err
    code, err = _run(project, "register", capsys=capsys)  # every method: none is trained yet
    assert code == 2 and "fine-tuned model missing" in err and "finetune@" in err
    assert not (project / "reports/registered.json").exists()


def test_an_exhausted_budget_exits_3_and_tells_the_scheduler(monkeypatch, tmp_path, capsys):
    """A step the budget guard refuses (BudgetExhausted, from anywhere under a command) is exit
    3, "privacy budget violation", and the scheduler's error file says so: it is never retried
    and never mistaken for a bug (5) or bad input (2)."""
    from privtune import cli
    from privtune.errors import BudgetExhausted

    def exhausted(args):
        raise BudgetExhausted("even noise multiplier 1000 cannot keep the run within epsilon 1")

    monkeypatch.setattr(cli, "_run", exhausted)
    error_file = tmp_path / "error.json"
    monkeypatch.setenv(cli.ERROR_FILE_ENV, str(error_file))
    code, err = _run(tmp_path, "finetune", "dpsgd", capsys=capsys)
    assert code == 3
    assert err.startswith("privacy budget violation: even noise multiplier 1000")
    assert json.loads(error_file.read_text()) == {
        "exit_code": 3,
        "error": "BudgetExhausted",
        "message": "even noise multiplier 1000 cannot keep the run within epsilon 1",
    }


def test_no_progress_also_hides_the_libraries_bars(monkeypatch, tmp_path, capfd):
    """`--no-progress` reaches transformers: loading a model prints no "Loading weights" bar
    (it did before, into every scheduled run's log)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from privtune.cli import quiet_library_progress

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)).save_pretrained(
        tmp_path / "tiny"
    )
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    hf_logging.enable_progress_bar()
    try:
        AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
        assert "Loading weights" in capfd.readouterr().err  # shown by default
        quiet_library_progress()
        AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
        assert "Loading weights" not in capfd.readouterr().err
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


@pytest.mark.parametrize("command", ["promote", "rollback"])
def test_with_json_a_failure_is_json_on_stdout_too(tmp_path, capsys, monkeypatch, command):
    """`--json` is for tools: a failure was plain text they could not parse. It is now one
    JSON object on stdout (exit code, error, field, problem, fix) with the words on stderr."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_params(tmp_path / "params.yaml")  # no store here: bad input, nothing created
    code = main(["--root", str(tmp_path), command, "--json"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert code == report["exit_code"] == 2 and report["error"] == "ModelError"
    assert report["message"] in err and report["fix"] in report["message"]
    assert report["field"] == "--root" and "no MLflow store" in report["problem"]
    assert main(["--root", str(tmp_path), command]) == 2
    assert capsys.readouterr().out == ""  # without --json: words on stderr alone


def test_with_json_an_unexpected_error_says_what_not_its_text(tmp_path, capsys, monkeypatch):
    """An unexpected error's text is a library's and may quote anything: the JSON names the
    class and the exit code; the traceback stays on stderr for the bug report."""
    from privtune import cli

    def crash(args):
        raise RuntimeError("Patient MRN 1234-5678 admitted")

    monkeypatch.setattr(cli, "_run", crash)
    assert main(["--root", str(tmp_path), "promote", "--json"]) == 5
    out, err = capsys.readouterr()
    assert json.loads(out) == {"exit_code": 5, "error": "RuntimeError", "message": "a bug"}
    assert "MRN" not in out and "Traceback" in err


def test_sigterm_landing_in_an_import_is_an_interruption_not_a_bug(tmp_path, capsys, monkeypatch):
    """SIGTERM raised inside an import can come out as that import's own error (a module left
    half-initialised): exit 5 and "a bug in privtune" with a traceback. It is exit 130, as
    any SIGTERM, and the next command's real bug is a bug again."""
    import os
    import signal
    import time

    from privtune import cli

    def import_hit(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread before the sleep ends
        except KeyboardInterrupt:
            raise ImportError("cannot import name 'x' (most likely a circular import)") from None
        raise AssertionError("SIGTERM did not arrive")

    monkeypatch.setattr(cli, "_run", import_hit)
    assert main(["--root", str(tmp_path), "promote"]) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err.startswith("terminated (SIGTERM): rerun the same command") and "Traceback" not in err

    def crash(args):
        raise ImportError("a real bug")

    monkeypatch.setattr(cli, "_run", crash)
    assert main(["--root", str(tmp_path), "promote"]) == cli.EXIT_UNEXPECTED
    assert "Traceback" in capsys.readouterr().err


def test_the_common_options_may_follow_the_command(tmp_path, capsys, monkeypatch):
    """`privtune check --params p.yaml` was "unrecognized arguments" (every torchrun rank
    printed the usage): --params, --root and --no-progress go before or after the command's
    name; one given before stands when the command's own part does not repeat it."""
    from privtune.cli import _parser

    parsed = _parser().parse_args(["finetune", "dpsgd", "--params", "p.yaml", "--no-progress"])
    assert (parsed.params, parsed.root, parsed.no_progress) == ("p.yaml", ".", True)
    parsed = _parser().parse_args(["--root", "r", "--params", "q.yaml", "check"])
    assert (parsed.params, parsed.root, parsed.no_progress) == ("q.yaml", "r", False)
    parsed = _parser().parse_args(["--root", "r", "check", "--root", "s"])
    assert parsed.root == "s"  # the later one, as for any repeated option
    assert main(["check", "--root", str(tmp_path / "nowhere")]) == 2
    assert "--root: " in capsys.readouterr().err


def test_under_torchrun_rank_0_alone_prints_a_usage_error(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert main(["finetune"]) == 2  # the method's name missing
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["finetune"]) == 2
    assert "the following arguments are required: name" in capsys.readouterr().err


def test_with_json_a_usage_error_is_json_on_stdout_too(capsys):
    assert main(["promote", "--json", "--version", "abc"]) == 2
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["exit_code"] == 2 and report["error"] == "UsageError"
    assert report["message"].startswith("argument --version: 'abc' is not a version number")
    assert "usage: privtune promote" in err
