"""Bad input a stage would refuse is refused before DVC runs the stage: DVC removes a stage's
outputs before its command starts, so the command's own error came after the last good
outputs were gone, and under Prefect as DVC's bare "failed to reproduce", retried."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from privtune import lanes
from privtune.errors import ConfigError, DataError
from tasks.stages import is_permanent, reproduce
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
    """tasks.stages.reproduce raises the stage's own error, naming the field, before DVC
    (this project is no DVC repository: reaching DVC would be NotDvcRepoError), and the
    task does not retry it."""
    edit_params(project, finetune=TOO_SMALL)
    before = _files(project)
    with pytest.raises(ConfigError, match="finetune.epsilon: 0.01 is out of reach") as raised:
        reproduce(str(project), "finetune@dpsgd")
    assert "finetune.accountant: pld" in str(raised.value) and is_permanent(raised.value)
    edit_params(project, prepare={"source": "inputs/notes.jsonl"})
    with pytest.raises(DataError, match="prepare.source: '.*inputs/notes.jsonl' does not exist"):
        reproduce(str(project), "prepare")
    assert _files(project).keys() - {"params.yaml"} == before.keys() - {"params.yaml"}
    assert all(_files(project)[k] == v for k, v in before.items() if k != "params.yaml")


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
