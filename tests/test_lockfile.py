"""dvc.lock entries carried between checkouts (`share`, tasks/lockfile.py): an adopted entry
is one DVC accepts, `dvc pull` then fetches exactly what the other checkout built, and what
cannot be carried is named. The whole round trip through a Prefect worker on another checkout
is tests/test_deployments.py's share test."""

import json
import uuid
from types import SimpleNamespace

import pytest

from privtune.io import tree_sha256
from tasks import lockfile
from tests.conftest import edit_params
from tests.test_pipeline import _sh, make_project


@pytest.fixture
def twins(tmp_path):
    """Two checkouts of one commit ("two machines") sharing one DVC remote."""
    store = tmp_path / "remote"
    pair = []
    for name in ("built", "adopting"):
        (tmp_path / name).mkdir()
        project = make_project(tmp_path / name)
        _sh(project, "dvc", "remote", "add", "--local", "-d", "shared", str(store))
        pair.append(project)
    return pair


def test_an_adopted_entry_pulls_what_the_other_checkout_built(twins):
    built, adopting = twins
    _sh(adopting, "dvc", "repro", "prepare")  # its own, older data ...
    mine = lockfile.entries(adopting, ["prepare"])
    for project in twins:  # ... then new data on both (another seed), built over there
        edit_params(project, prepare={"seed": 7})
    _sh(built, "dvc", "repro", "prepare")
    _sh(built, "dvc", "push", "prepare")
    theirs = lockfile.entries(built, ["prepare"])
    assert theirs["prepare"]["outs"] != mine["prepare"]["outs"]

    lockfile.adopt(adopting, theirs)
    _sh(adopting, "dvc", "pull", "prepare")
    assert lockfile.entries(adopting, ["prepare"]) == theirs
    assert "Data and pipelines are up to date" in _sh(adopting, "dvc", "status", "prepare")
    assert tree_sha256(adopting / "data/prepared") == tree_sha256(built / "data/prepared")


def test_adopting_keeps_the_other_stages_entries(twins):
    _, adopting = twins
    _sh(adopting, "dvc", "repro", "prepare")
    prepare = lockfile.entries(adopting, ["prepare"])
    lockfile.adopt(adopting, {"finetune@dpsgd": {"cmd": "privtune finetune dpsgd", "outs": []}})
    found = lockfile.entries(adopting, ["prepare", "finetune@dpsgd"])
    assert found["finetune@dpsgd"]["cmd"] == "privtune finetune dpsgd"
    assert found["prepare"] == prepare["prepare"]
    assert (adopting / "dvc.lock").read_text().startswith("schema: '2.0'")
    assert "Data and pipelines are up to date" in _sh(adopting, "dvc", "status", "prepare")


def test_a_missing_entry_names_the_stage_and_the_command(twins):
    _, adopting = twins
    with pytest.raises(lockfile.LockEntryError, match=r"no entry for base: run `dvc repro base`"):
        lockfile.entries(adopting, ["base"])


def test_the_uncached_outputs_are_the_stage_metrics_and_plots(twins):
    """What the remote does not hold travels in the published artifact instead."""
    built, _ = twins
    assert lockfile.uncached(built, "finetune@dpsgd") == [
        "metrics/finetune-dpsgd.json",
        "plots/finetune-dpsgd.csv",
        "plots/finetune-dpsgd.png",
    ]
    assert lockfile.uncached(built, "prepare") == []


def test_received_files_and_entry_land_together(twins):
    """Text files travel readable, binary ones (the PNG plot) byte for byte."""
    _, adopting = twins
    png = b"\x89PNG\r\n\x1a\n\x00\xff"
    built = {
        "stage": "finetune@dpsgd",
        "entry": {"cmd": "privtune finetune dpsgd"},
        "files": {
            "metrics/finetune-dpsgd.json": lockfile._pack(b'{"epsilon": 1.0}\n'),
            "plots/finetune-dpsgd.png": lockfile._pack(png),
        },
    }
    assert "text" in built["files"]["metrics/finetune-dpsgd.json"]
    lockfile.receive(adopting, json.loads(json.dumps(built)))  # as it travels
    assert (adopting / "metrics/finetune-dpsgd.json").read_text() == '{"epsilon": 1.0}\n'
    assert (adopting / "plots/finetune-dpsgd.png").read_bytes() == png
    assert lockfile.entries(adopting, ["finetune@dpsgd"])["finetune@dpsgd"] == built["entry"]


def test_a_run_that_published_nothing_is_named():
    """A worker whose checkout predates carrying the entry: say so instead of pulling stale."""
    client = SimpleNamespace(read_artifacts=lambda **_: [SimpleNamespace(data="no fence")])
    run = uuid.uuid4()
    with pytest.raises(lockfile.LockEntryError, match=f"flow run {run} published no dvc.lock"):
        lockfile.published(client, run, "finetune@dpsgd")
    assert lockfile.artifact_key("finetune@per_adapter") == "dvc-lock-finetune-per-adapter"
