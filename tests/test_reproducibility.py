"""The base model is the same bytes however the machine is set up (fixed threads and
deterministic algorithms inside the stage), so a fresh clone reproduces dvc.lock."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from privtune import io
from privtune.cli import main
from tests.conftest import write_params


def test_base_stage_writes_the_same_model_bytes_whatever_the_threads(tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    write_params(first / "params.yaml")
    assert main(["--root", str(first), "--no-progress", "prepare"]) == 0
    second = tmp_path / "second"
    shutil.copytree(first, second)
    hashes = []
    for root, threads in ((first, "1"), (second, "2")):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        command = [sys.executable, "-m", "privtune.cli", "--root", str(root), "--no-progress"]
        subprocess.run([*command, "base"], env=env, check=True, capture_output=True)
        hashes.append(io.tree_sha256(root / "models" / "base"))
    assert hashes[0] == hashes[1]
