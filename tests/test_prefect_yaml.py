"""prefect.yaml declares valid deployments whose entrypoints are real flows."""

import importlib.util
from pathlib import Path

import yaml
from prefect import Flow
from prefect.cli.deploy._models import PrefectYamlModel

ROOT = Path(__file__).resolve().parents[1]


def test_deployments_parse_and_point_at_flows():
    model = PrefectYamlModel.model_validate(yaml.safe_load((ROOT / "prefect.yaml").read_text()))
    assert model.deployments, "no deployment declared"
    for deployment in model.deployments:
        path, name = deployment.entrypoint.split(":")
        spec = importlib.util.spec_from_file_location("flow_module", ROOT / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert isinstance(getattr(module, name), Flow)
    nightly = next(d for d in model.deployments if d.name == "nightly-pipeline")
    assert nightly.schedules[0].cron == "0 2 * * *"
    assert nightly.work_pool.name == "privtune-cpu"
    # a deployment's tags go on every run, a manual one too: none may claim a schedule
    assert not [t for d in model.deployments for t in d.tags or () if "schedul" in t]
