"""Bad input a stage would refuse is refused before DVC runs the stage: DVC removes a stage's
outputs before its command starts, so the command's own error came after the last good
outputs were gone, and under Prefect as DVC's bare "failed to reproduce", retried."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from privtune import lanes
from privtune.config import load_params
from privtune.errors import ConfigError
from tasks.stages import PermanentStageError, is_permanent, reproduce
from tests.conftest import edit_params

TOO_SMALL = {"epsilon": 0.01, "accountant": "rdp"}  # below what RDP certifies here, any noise


@pytest.fixture
def project(tiny_project, tmp_path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(tiny_project, root)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_the_scheduler_refuses_before_dvc_and_keeps_the_outputs(project):
    """tasks.stages.reproduce raises the stage's own error, naming the stage and the field,
    before DVC (this project is no DVC repository: reaching DVC would be NotDvcRepoError),
    and the task does not retry it."""
    edit_params(project, finetune=TOO_SMALL)
    before = _files(project)
    refused = pytest.raises(PermanentStageError, match="finetune.epsilon: 0.01 is out of reach")
    with refused as raised:
        reproduce(str(project), "finetune@dpsgd")
    assert raised.value.target == "finetune@dpsgd" and raised.value.exit_code == 2
    assert raised.value.error == "ConfigError" and isinstance(raised.value.__cause__, ConfigError)
    assert "finetune.accountant: pld" in str(raised.value) and is_permanent(raised.value)
    edit_params(project, prepare={"source": "inputs/notes.jsonl"})
    with pytest.raises(PermanentStageError, match="prepare.source: '.*notes.jsonl' does not ex"):
        reproduce(str(project), "prepare")
    assert _files(project).keys() - {"params.yaml"} == before.keys() - {"params.yaml"}
    assert all(_files(project)[k] == v for k, v in before.items() if k != "params.yaml")


def test_a_library_failure_in_the_preflight_is_left_to_the_stage(project, monkeypatch):
    """Anything but privtune's own errors is not the preflight's to report: a library's
    exception (which may quote what it read: a record, a path) is not raised to the scheduler
    (a Prefect task state, a lane's log) but left to the stage, which raises it in its own
    process with its traceback (exit 5). A privtune error still comes through."""
    from privtune.errors import DataError
    from privtune.stages import finetune, preflight, prepare

    def library_failure(*args, **kwargs):
        raise ValueError("Patient 4411 was admitted with ...")

    monkeypatch.setattr(prepare, "build", library_failure)
    monkeypatch.setattr(finetune, "finetune_plan", library_failure)
    assert preflight.check(project, "prepare") is None
    assert preflight.check(project, "finetune@dpsgd") is None
    assert preflight.check_project(project) is None

    def refused(*args, **kwargs):
        raise DataError("prepare.source", "no text column", "name it")

    monkeypatch.setattr(prepare, "build", refused)
    with pytest.raises(DataError, match="prepare.source"):
        preflight.check(project, "prepare")


def test_a_good_project_passes_and_other_stages_are_left_to_dvc(project):
    from privtune.stages import preflight

    for target in ("prepare", "finetune@dpsgd", "finetune@nonprivate", "evaluate@dpsgd"):
        preflight.check(project, target)
    shutil.rmtree(project / "data" / "prepared")  # not prepared yet: DVC says so, not this
    edit_params(project, finetune=TOO_SMALL)
    preflight.check(project, "finetune@dpsgd")


def test_a_lane_refuses_before_dvc_and_names_the_field(project, tmp_path):
    edit_params(project, finetune=TOO_SMALL)
    called = tmp_path / "dvc-was-called"
    dvc = tmp_path / "dvc"
    dvc.write_text(f"#!/bin/sh\ntouch {called}\n")
    dvc.chmod(0o755)
    run = lanes.Lanes(project, 2, ["dpsgd"])
    run.dvc = str(dvc)
    assert not run.stage("finetune@dpsgd")
    record = run.records[-1]
    assert record["status"] == "failed" and record["exit_code"] == 2
    assert record["message"].startswith("finetune.epsilon: 0.01 is out of reach")
    assert "error: finetune.epsilon" in (project / record["log"]).read_text()
    assert not called.exists() and run.running == []


def test_privtune_check_prints_the_plan_and_refuses_what_the_stages_would(project, capsys):
    from privtune.cli import main

    before = _files(project)
    assert main(["--root", str(project), "check"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("prepare: train ") and out[0].endswith(" records")
    assert any(
        line.startswith("finetune@dpsgd (clip 1.0): N ") and "noise multiplier" in line
        for line in out
    )
    assert any(line.startswith("finetune@nonprivate: N ") and "not private" in line for line in out)
    # a corpus with a malformed line: refused by name and line, data/prepared untouched
    (project / "inputs").mkdir()
    (project / "inputs" / "notes.jsonl").write_text('{"text": "one note"}\n{"text": \n')
    edit_params(project, prepare={"source": "inputs/notes.jsonl"})
    assert main(["--root", str(project), "check"]) == 2
    assert "line 2 is not valid JSON" in capsys.readouterr().err
    edit_params(project, prepare={"source": "src/privtune/data/generator.py"}, finetune=TOO_SMALL)
    assert main(["--root", str(project), "check"]) == 2
    assert "finetune.epsilon: 0.01 is out of reach" in capsys.readouterr().err
    changed = {k for k, v in _files(project).items() if before.get(k) != v}
    assert changed == {"params.yaml", "inputs/notes.jsonl"}
    # --params, as for every command: that file's parameters, not the project's
    other = project / "other.yaml"
    other.write_text((project / "params.yaml").read_text())
    edit_params(project, finetune={"epsilon": 8.0})
    assert main(["--root", str(project), "--params", str(other), "check"]) == 2
    assert "finetune.epsilon: 0.01 is out of reach" in capsys.readouterr().err


def test_an_error_under_dvc_repro_says_what_dvc_removed_and_how_it_comes_back(
    project, capsys, monkeypatch
):
    from privtune.cli import main

    edit_params(project, finetune=TOO_SMALL)
    assert main(["--root", str(project), "finetune", "dpsgd"]) == 2
    assert "run cache" not in capsys.readouterr().err  # run by hand: DVC removed nothing
    monkeypatch.setenv("DVC_STAGE", "finetune@dpsgd")  # what `dvc repro` sets
    assert main(["--root", str(project), "finetune", "dpsgd"]) == 2
    err = capsys.readouterr().err
    assert "removed finetune@dpsgd's previous outputs" in err
    assert "DVC's run cache" in err and "`privtune check`" in err
    # `dvc exp run` in the workspace removes them too, and leaves its -S values in params.yaml
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)
    monkeypatch.chdir(project)
    assert main(["--root", str(project), "finetune", "dpsgd"]) == 2
    err = capsys.readouterr().err
    assert "`dvc exp run` removed finetune@dpsgd's previous outputs from the workspace" in err
    assert "`git checkout params.yaml`" in err and "DVC's run cache" in err
    assert "`privtune check` them before `dvc exp run`" in err
    apart = project / ".dvc" / "tmp" / "exps" / "tmp1234"  # `dvc exp run --temp`: a copy
    apart.mkdir(parents=True)
    monkeypatch.chdir(apart)
    assert main(["--root", str(project), "finetune", "dpsgd"]) == 2
    assert "run cache" not in capsys.readouterr().err


def test_a_stage_knows_whether_dvc_exp_run_builds_it_in_the_workspace(tmp_path):
    """What DVC really does (a toy repository): `dvc exp run` runs a stage in the workspace,
    `dvc exp run --temp` in a copy under .dvc/tmp/exps, both with DVC_EXP_BASELINE_REV set;
    `dvc repro` without it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def sh(*args: str) -> None:
        subprocess.run(args, cwd=tmp_path, env=env, check=True, capture_output=True)

    sh("git", "init", "-q")
    sh("git", "config", "user.name", "t")  # `dvc exp run` commits: an identity of its own
    sh("git", "config", "user.email", "t@t")
    sh("dvc", "init", "-q")
    (tmp_path / "params.yaml").write_text("x: 1\n")
    probe = "from privtune.cli import built_apart; print(built_apart())"
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n  s:\n    cmd: {sys.executable} -c '{probe}' > apart.txt\n"
        "    params: [x]\n    outs: [apart.txt]\n"
    )
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "toy")
    sh("dvc", "repro", "-q")
    assert (tmp_path / "apart.txt").read_text().strip() == "False"
    sh("dvc", "exp", "run", "-q", "-S", "x=2")
    assert (tmp_path / "apart.txt").read_text().strip() == "False"
    sh("dvc", "exp", "run", "-q", "--temp", "-S", "x=3", "--name", "in-a-copy")
    sh("dvc", "exp", "apply", "in-a-copy")
    assert (tmp_path / "apart.txt").read_text().strip() == "True"


def test_an_lmo_law_no_candidate_fits_is_refused_before_the_model_loads(project, capsys):
    """The LMO-DP law's search needs only the plan: an epsilon no candidate of the grid
    reaches is refused by the preflight and by the stage before it loads the base model
    (the base is removed here: reaching it would be a model error instead)."""
    from privtune.cli import main
    from privtune.stages import preflight

    edit_params(project, finetune={"epsilon": 0.3}, methods={"lmo": {"grid": "paper"}, "dpsgd": {}})
    refused = "finetune.epsilon: no LMO-DP candidate in grid paper-v1 reaches epsilon <= 0.3"
    with pytest.raises(ConfigError, match=refused):
        preflight.check(project, "finetune@lmo")
    preflight.check(project, "finetune@dpsgd")  # DP-SGD's Gaussian noise certifies 0.3
    shutil.rmtree(project / "models" / "base")
    assert main(["--root", str(project), "--no-progress", "finetune", "lmo"]) == 2
    err = capsys.readouterr().err
    assert refused in err and "grid: extended" in err and "models/base" not in err
    # privtune check names the entry (finetune.epsilon is every entry's), and reads the
    # method's search cache without writing it: it writes nothing
    edit_params(project, methods={"lmo": {"cache": "lmo-searches.json"}})
    assert main(["--root", str(project), "check"]) == 2
    assert f"{refused} over " in (err := capsys.readouterr().err) and "(finetune@lmo)" in err
    assert not (project / "lmo-searches.json").exists()
    # within the grid's reach: privtune check names the law it found and what it spends, not
    # a Gaussian multiplier LMO-DP does not use (the extended grid reaches lower, in 20 s)
    entries = {"lmo": {"grid": "paper"}, "decay": {}, "rldp": {"rl_interval": 3}}
    entries["anchor"] = {"method": "rldp", "policy": False}
    edit_params(project, finetune={"epsilon": 1.0}, methods=entries)
    assert main(["--root", str(project), "check"]) == 0
    out = capsys.readouterr().out.splitlines()
    (line,) = [x for x in out if x.startswith("finetune@lmo")]
    spent = re.search(
        r"LMO-DP law with noise std \S+ .*, spending epsilon (\S+) of 1 \(rdp\)$", line
    )
    assert spent and 0.9 < float(spent[1]) <= 1.0 and "noise multiplier" not in line, line
    # a decaying schedule: its phases' multipliers, not the constant one
    (line,) = [x for x in out if x.startswith("finetune@decay")]
    phases = re.search(
        r"noise multiplier ((?:\S+ → )+\S+) over (\d) phases, spending epsilon", line
    )
    assert phases, line
    noises = [float(z) for z in phases[1].split(" → ")]
    assert len(noises) == int(phases[2]) > 1 and noises == sorted(noises, reverse=True)
    # RLDP: the policy's range around the budget-paced noise, or the anchor alone
    (line,) = [x for x in out if x.startswith("finetune@rldp (rl_interval 3)")]
    assert "0.9-1.1 x the budget-paced noise multiplier" in line and "every 3 steps" in line
    (line,) = [x for x in out if x.startswith("finetune@anchor (rldp, policy False)")]
    assert line.endswith("at an even pace), the anchor alone (policy: false)"), line


def test_check_warns_when_the_attack_cannot_measure_a_promotion_gate(project, capsys):
    """Fewer than 100 non-members cannot resolve a 1 % FPR: every model would train, then be
    refused by `privtune promote` as insufficient evidence. check says so first, with the
    corpus size that fixes it, and that size is exactly enough."""
    from privtune.cli import main

    assert main(["--root", str(project), "check"]) == 0  # the tiny project: 10 members
    warning = next(line for line in capsys.readouterr().out.splitlines() if "warning" in line)
    assert "attack.members 10" in warning and "mia_tpr_at_fpr_0.01" in warning
    need = int(re.search(r"needs at least (\d+) records", warning).group(1))
    # the corpus's own records: not the public passages, not the audit's canaries
    params = load_params(project / "params.yaml")
    assert f"(these are {params.prepare.n_private})" in warning
    (project / "inputs").mkdir()
    notes = project / "inputs" / "notes.jsonl"
    edit_params(
        project,
        prepare={"source": "inputs/notes.jsonl"},
        attack={"members": 100},
        evaluate={"task": None},  # these notes have no downstream task
    )
    for n, code in ((need, 0), (need - 1, 2)):
        lines = (f'{{"text": "Note {i}: stable, discharged."}}\n' for i in range(n))
        notes.write_text("".join(lines))
        assert main(["--root", str(project), "check"]) == code
        captured = capsys.readouterr()
        assert "warning" not in captured.out
        assert code == 0 or "attack.members" in captured.err


def test_check_warns_when_the_private_methods_will_spend_more_than_the_gate(project, capsys):
    """finetune.epsilon 4 with a `max_epsilon: 2` gate: every private model would train, then
    be refused by `privtune promote`; check names the methods and both settings (a warning, as
    a sweep past the gate may mean it), and says nothing at or below the gate."""
    from privtune.cli import main

    def warned() -> list[str]:
        assert main(["--root", str(project), "check"]) == 0
        out = capsys.readouterr().out.splitlines()
        return [line for line in out if "registry.gates.max_epsilon" in line]

    assert warned() == []  # this project's epsilon 4 under the default gate 8
    edit_params(project, registry={"gates": {"max_epsilon": 2}})
    params = load_params(project / "params.yaml")
    private = [m for m in params.methods if m != "nonprivate"]
    assert "nonprivate" in params.methods and private
    (line,) = warned()
    assert line.startswith("warning: finetune.epsilon 4 is above registry.gates.max_epsilon 2")
    assert f"refuse {', '.join(private)} on gate epsilon" in line and "nonprivate" not in line
    edit_params(project, finetune={"epsilon": 2})
    assert warned() == []


def test_check_tries_the_cloze_pattern_on_the_corpus(project, capsys):
    """A downstream pattern that marks no answer in the notes is refused by check, as the base
    stage would (it passed check and failed at `dvc repro base`); one that does passes."""
    from privtune.cli import main

    edit_params(project, evaluate={"task": "cloze", "cloze": {"pattern": "ICD10 ([A-Z]+)"}})
    assert main(["--root", str(project), "check"]) == 2
    err = capsys.readouterr().err
    assert "evaluate.cloze.pattern" in err and "marks an answer in 0 test note(s)" in err
    # the scheduler's check of the base stage, before DVC removes the base model to run it
    from privtune.errors import DataError
    from privtune.stages import preflight

    assert (project / "data/prepared/test.jsonl").is_file()
    with pytest.raises(DataError, match="evaluate.cloze.pattern"):
        preflight.check(project, "base")
    edit_params(project, evaluate={"task": "cloze", "cloze": {"pattern": r"(\d+) mg"}})
    assert main(["--root", str(project), "check"]) == 0


def test_the_roc_helpers_the_check_reads_load_without_the_model_libraries():
    """`privtune check` (before every pipeline and profile run) reads the attacks' ROC
    helpers; the attacks package used to import all its modules, peft and transformers with
    them (about 7 s of the check's 15)."""
    import subprocess
    import sys

    probe = (
        "import sys, privtune.attacks.roc; "
        "print(sorted({'peft', 'transformers'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    from privtune.attacks import RocSummary, run_attacks  # the package's names still load

    assert RocSummary.__name__ == "RocSummary" and callable(run_attacks)


def _canary_warning(out: str) -> str | None:
    return next((line for line in out.splitlines() if "planted canary occurrences" in line), None)


def test_check_counts_the_canaries_training_will_not_see_as_attack_does(project, capsys):
    """Canaries are planted by characters before any tokenizer exists: under a short
    base.max_length some lie past the cut and their exposure says nothing. check counts them
    before anything trains, with the tokenizer the base stage will train (no model): the count
    the attack stage makes from what prepare and base wrote, and never a canary's text."""
    from privtune.cli import main
    from privtune.data.canaries import trained_occurrences
    from privtune.stages.attack import read_canaries
    from privtune.stages.common import load_base, read_split

    canaries, train = read_canaries(project), read_split(project, "train")
    tokenizer = load_base(project)[1]  # what the base stage wrote for these params
    max_length = 128  # of a 400-token vocabulary: some canaries lie past it, some within
    edit_params(project, base={"max_length": max_length})  # (its tokenizer does not change)
    texts = [r["text"] for r in train]
    trained = sum(trained_occurrences(canaries, texts, tokenizer, max_length).values())
    planted = sum(c.repetitions for c in canaries)
    assert 0 < trained < planted

    assert main(["--root", str(project), "check"]) == 0
    warning = _canary_warning(capsys.readouterr().out)
    assert warning.startswith(f"warning: {planted - trained} of {planted} planted canary ")
    assert f"base.max_length = {max_length} tokens" in warning
    assert "prepare.canaries.max_offset" in warning
    assert not any(c.secret in warning or c.prefix.strip() in warning for c in canaries)
    edit_params(project, prepare={"canaries": {"max_offset": 0}})  # every canary a note's start
    assert main(["--root", str(project), "check"]) == 0
    assert _canary_warning(capsys.readouterr().out) is None


def test_check_reads_a_local_models_tokenizer_and_refuses_a_missing_directory(project, capsys):
    """A local `from_pretrained` directory: its own tokenizer counts the canaries (no model is
    loaded); a directory without a tokenizer is left to the base stage (which names what is
    missing); a base.source that is no directory is the base stage's error, before it runs."""
    from privtune.cli import main
    from privtune.data.tokenization import train_tokenizer
    from tests.conftest import synthetic_texts
    from tests.tiny_gguf import tiny_llama

    tokenizer = train_tokenizer(synthetic_texts(300), 320)
    model = tiny_llama(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    model.save_pretrained(project / "llama")
    tokenizer.save_pretrained(project / "llama")
    edit_params(project, base={"source": "llama", "max_length": 24})
    assert main(["--root", str(project), "check"]) == 0
    assert "base.max_length = 24 tokens" in _canary_warning(capsys.readouterr().out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (project / "llama" / name).unlink(missing_ok=True)
    assert main(["--root", str(project), "check"]) == 0
    assert _canary_warning(capsys.readouterr().out) is None
    before = _files(project)
    edit_params(project, base={"source": "no-such-model"})
    assert main(["--root", str(project), "check"]) == 2
    err = capsys.readouterr().err
    assert "base.source" in err and "'no-such-model' is neither a known source" in err
    assert {k for k, v in _files(project).items() if before.get(k) != v} == {"params.yaml"}


def test_a_whole_run_says_the_checks_warnings_before_it_starts(project, capsys):
    """The pipeline flow and a profile's run check the project whole first (check_project):
    its warnings (here: 10 members a side, and canaries that 64 tokens cut) reach the user
    then, before anything trains, and its plan lines do not."""
    from privtune.stages.preflight import check_project

    check_project(project)
    err = capsys.readouterr().err
    assert "warning: attack.members 10" in err and "planted canary occurrences lie past" in err
    assert "finetune@dpsgd" not in err
