"""The GPU checks' scripts (README, "GPU checks on a machine without internet"): they are only
run where a GPU is lent, so what can break them unnoticed in between is checked here."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def test_every_wheel_the_gpu_machine_gets_is_pinned_in_the_lock_file():
    script = (SCRIPTS / "device_wheels.sh").read_text()
    packages = re.search(r"PACKAGES=\((.*?)\)", script, re.S).group(1).split()
    lock = (ROOT / "requirements.lock").read_text().lower()
    assert "opacus" in packages and "pydantic-core" in packages
    for package in packages:
        assert re.search(rf"^{re.escape(package)}==", lock, re.M), package


@pytest.mark.parametrize("name", ["device_wheels.sh", "device_check.sh"])
def test_the_device_scripts_parse(name):
    subprocess.run(["bash", "-n", str(SCRIPTS / name)], check=True)
