"""params.yaml validation: impossible values give errors naming the field and the fix."""

from pathlib import Path

import pytest
import yaml

from privtune.config import load_params, parse_params
from privtune.control.base import ControllerContext
from privtune.control.registry import build_controller
from privtune.errors import ConfigError
from privtune.train import make_plan

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_file_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert {"nonprivate", "dpsgd"} <= set(params.methods)
    assert params.method("dpsgd") == ("dpsgd", {"clip": 1.0})


@pytest.mark.parametrize("epsilon", [0, -1.0, float("inf"), float("nan")])
def test_impossible_epsilon(epsilon):
    with pytest.raises(ConfigError, match=r"finetune\.epsilon") as err:
        parse_params({"finetune": {"epsilon": epsilon}})
    assert "Fix:" in str(err.value)


@pytest.mark.parametrize("delta", [0, 1.0, -1e-5])
def test_delta_outside_unit_interval(delta):
    with pytest.raises(ConfigError, match=r"finetune\.delta"):
        parse_params({"finetune": {"delta": delta}})


def test_delta_must_be_below_one_over_n():
    params = parse_params({"finetune": {"delta": 0.01}})
    with pytest.raises(ConfigError, match=r"finetune\.delta.*below 1/N"):
        make_plan(1000, params.finetune, private=True)
    assert make_plan(1000, parse_params({}).finetune, private=False).delta == pytest.approx(1e-4)


def test_unknown_key_is_rejected_with_its_dotted_name():
    with pytest.raises(ConfigError, match=r"finetune\.lora\.rank.*unknown parameter"):
        parse_params({"finetune": {"lora": {"rank": 4}}})


def test_unknown_method_and_bad_option():
    params = parse_params({"methods": {"fancy": {}, "dpsgd": {"clipp": 1.0}}})
    ctx = ControllerContext(("all",), 0.1, 10, 1.0, 1e-5, 1.0)
    method, options = params.method("fancy")
    with pytest.raises(ConfigError, match=r"methods\.fancy.*unknown method 'fancy'.*dpsgd"):
        build_controller(method, ctx, options, "fancy")
    method, options = params.method("dpsgd")
    with pytest.raises(ConfigError, match=r"methods\.dpsgd\.clipp"):
        build_controller(method, ctx, options, "dpsgd")
    with pytest.raises(ConfigError, match=r"methods\.missing"):
        params.method("missing")


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("finetune: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text(yaml.safe_dump({"finetune": {"epsilon": "eight"}}))
    with pytest.raises(ConfigError, match=r"finetune\.epsilon"):
        load_params(bad)
