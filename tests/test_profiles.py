"""Parameter profiles become `dvc exp run -S` overrides that DVC's grammar accepts; the SmolLM2
profiles validate against the schema and pass the registry's delta gate."""

from pathlib import Path

import pytest
import yaml

from privtune.config import parse_params
from privtune.errors import ConfigError
from privtune.profiles import command, merged, overrides

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_change_add_and_replace_the_method_list():
    params = {
        "base": {"source": "build", "max_length": 384},
        "finetune": {"lora": {"r": 8}},
        "methods": {"nonprivate": {}, "dpsgd": {"clip": 1.0, "extra": 2}, "lmo": {"clip": 1.0}},
    }
    profile = {
        "base": {"source": "smollm2-135m", "max_length": "auto"},
        "finetune": {"delta": 1e-5, "lora": {"target_modules": ["q_proj", "v_proj"]}},
        "methods": {"nonprivate": {}, "dpsgd": {"clip": 0.5}, "rldp": {"rl_interval": 5}},
    }
    target = merged(profile, params)
    assert target["methods"] == profile["methods"]  # replaced, not merged
    assert target["finetune"]["lora"] == {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    assert overrides(target, params) == [
        "base.source=smollm2-135m",
        "base.max_length=auto",
        "+finetune.lora.target_modules=[q_proj,v_proj]",
        "+finetune.delta=1.0e-05",
        "~methods.lmo",
        "~methods.dpsgd.extra",
        "methods.dpsgd.clip=0.5",
        "+methods.rldp={rl_interval:5}",
    ]
    assert overrides(params, params) == []


@pytest.mark.parametrize("cpu", [False, True])
def test_smollm2_profiles_are_valid_and_pass_the_delta_gate(cpu):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    target = merged(yaml.safe_load((ROOT / "params-smollm2.yaml").read_text()), params)
    if cpu:
        target = merged(yaml.safe_load((ROOT / "params-smollm2-cpu.yaml").read_text()), target)
    checked = parse_params(target)
    assert checked.base.source == "smollm2-135m"
    assert checked.finetune.delta <= checked.registry.gates.max_delta
    expected = {"nonprivate", "dpsgd", "rldp"} if cpu else set(params["methods"])
    assert set(checked.methods) == expected


def test_a_bad_profile_fails_before_dvc_runs(tmp_path):
    bad = tmp_path / "params-bad.yaml"
    bad.write_text("base: {max_length: longest}\n")
    with pytest.raises(ConfigError, match=r"base\.max_length"):
        command([bad], ROOT / "params.yaml", "bad")
    cmd = command([ROOT / "params-smollm2.yaml"], ROOT / "params.yaml", "smollm2")
    assert cmd[:5] == ["dvc", "exp", "run", "-n", "smollm2"]
    assert "base.source=smollm2-135m" in cmd and "finetune.delta=1.0e-05" in cmd
    assert yaml.safe_load("x: 1.0e-05")["x"] == 1e-5  # how params.yaml is read back
