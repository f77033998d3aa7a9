"""`python flows/<name>.py --help` prints its usage: it ran the whole flow (the pipeline, the
81-run sweep, a promotion) whatever its arguments."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    ("module", "flow"),
    [
        ("flows.pipeline", "pipeline"),
        ("flows.sweep", "sweep"),
        ("flows.promote", "promote"),
        ("flows.finetune", "finetune"),
    ],
)
def test_help_and_unknown_arguments_run_no_flow(module, flow, monkeypatch, capsys):
    script = importlib.import_module(module)
    monkeypatch.setattr(script, flow, lambda *a, **k: pytest.fail(f"{flow} ran"))
    with pytest.raises(SystemExit) as done:
        script.main(["--help"])
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        script.main(["--no-such-option"])
    assert done.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_the_arguments_reach_the_flows(monkeypatch):
    import flows.pipeline
    import flows.promote

    seen = {}
    monkeypatch.setattr(flows.pipeline, "pipeline", lambda **kw: seen.update(kw))
    flows.pipeline.main(["--methods", "dpsgd", "rldp", "--profile", "quick"])
    assert seen == {
        "methods": ["dpsgd", "rldp"], "profile": "quick", "overrides": None, "force": False,
        "promote": False,
    }  # fmt: skip
    flows.pipeline.main(
        ["--set", "finetune.epsilon=4", "--set", "finetune.lora.target_modules=[q_proj, v_proj]",
         "--set", "evaluate.max_records=null", "--set", "prepare.source=corpus/a=b.csv"]
    )  # fmt: skip
    assert seen["overrides"] == {
        "finetune.epsilon": 4, "finetune.lora.target_modules": ["q_proj", "v_proj"],
        "evaluate.max_records": None, "prepare.source": "corpus/a=b.csv",
    }  # fmt: skip
    for bad in ("finetune.epsilon", "=4", "finetune..lr=1", "finetune.lr=[1"):
        with pytest.raises(SystemExit) as done:
            flows.pipeline.main(["--set", bad])
        assert done.value.code == 2
    monkeypatch.setattr(flows.promote, "rollback", lambda: seen.update(rolled=True))
    flows.promote.main(["rollback"])
    assert seen["rolled"]


def test_a_run_over_some_methods_returns_their_metrics_not_the_others():
    from flows.pipeline import metrics_of

    shown = {
        f"metrics/{stage}-{m}.json": {"data": {"m": m}}
        for stage in ("finetune", "attack")
        for m in ("dpsgd", "rldp", "nonprivate")
    } | {"metrics/base.json": {"data": {"base": 1}}}
    every = ["nonprivate", "dpsgd", "rldp"]
    assert sorted(metrics_of(shown, ["dpsgd"], every)) == [
        "metrics/attack-dpsgd.json", "metrics/base.json", "metrics/finetune-dpsgd.json",
    ]  # fmt: skip
    assert metrics_of(shown, every, every) == {k: v["data"] for k, v in shown.items()}
    # a method whose name ends with another's keeps its own files
    shown = {"metrics/finetune-lmo-dpsgd.json": {"data": {}}, "metrics/finetune-dpsgd.json": {}}
    assert list(metrics_of(shown, ["lmo-dpsgd"], ["lmo-dpsgd", "dpsgd"])) == [
        "metrics/finetune-lmo-dpsgd.json"
    ]


@pytest.mark.parametrize(
    ("module", "flow", "argv"),
    [
        ("flows.pipeline", "pipeline", []),
        ("flows.sweep", "sweep", []),
        ("flows.promote", "promote", []),
        ("flows.finetune", "finetune", ["dpsgd"]),
    ],
)
def test_the_scripts_turn_telemetry_off_before_prefects_server_starts(
    module, flow, argv, monkeypatch
):
    """`python flows/pipeline.py` started Prefect's temporary server with its analytics on (a
    heartbeat that phones home, and a 'database is locked' traceback in every local run's log
    where there is no internet): the flow's own call came after the server had started."""
    import os

    from privtune.tracking import TELEMETRY_OFF

    script = importlib.import_module(module)
    for key in TELEMETRY_OFF:
        monkeypatch.delenv(key, raising=False)
    seen = {}
    monkeypatch.setattr(script, flow, lambda *a, **k: seen.update(os.environ))
    script.main(argv)
    assert {key: seen.get(key) for key in TELEMETRY_OFF} == TELEMETRY_OFF


def test_a_second_pipeline_run_on_a_project_waits_for_the_first(tmp_path, monkeypatch):
    """Two runs of one project at once (a second trigger while the nightly runs) took DVC's
    lock in turns and one failed with its LockError; the second now waits, saying for whom.
    A profile's project is another project: its run does not wait for the checkout's."""
    import shutil
    import threading
    from pathlib import Path
    from types import SimpleNamespace

    import flows.pipeline

    checkout = Path(__file__).resolve().parents[1]
    for name in ("params.yaml", "profiles.yaml"):
        shutil.copy(checkout / name, tmp_path / name)
    said: list[str] = []
    logger = SimpleNamespace(info=lambda text, *args: said.append(text % args))
    monkeypatch.setattr(flows.pipeline, "get_run_logger", lambda: logger)
    root = str(tmp_path)

    def second(profile, started, done):
        started.set()
        with flows.pipeline.one_run_per_project(root, profile, None):
            done.set()

    with flows.pipeline.one_run_per_project(root, None, None):
        runs = {}
        for profile in (None, "quick"):
            started, done = threading.Event(), threading.Event()
            thread = threading.Thread(target=second, args=(profile, started, done))
            thread.start()
            started.wait(5)
            runs[profile] = (thread, done)
        assert runs["quick"][1].wait(10)  # another project: not held up
        assert not runs[None][1].wait(1.5)  # the same project: waits
        assert said and said[0].startswith("waiting for privtune pid ")
        assert said[0].endswith("which runs the pipeline on this checkout")
    assert runs[None][1].wait(10)  # then runs
    for thread, _ in runs.values():
        thread.join(10)


@pytest.mark.parametrize(
    ("module", "flow", "args"),
    [
        ("flows.pipeline", "pipeline", ()),
        ("flows.promote", "promote", ()),
        ("flows.promote", "rollback", ()),
        ("flows.finetune", "finetune", ("dpsgd",)),
        ("flows.sweep", "sweep", ()),
    ],
)
def test_a_flow_given_a_root_that_is_no_project_names_its_root_parameter(
    module, flow, args, tmp_path
):
    """A deployment run with `--param root=profiles/quik` said "parameter file not found.
    Fix: ... pass --params", a command-line option no flow run has."""
    from privtune.errors import ConfigError

    run = getattr(importlib.import_module(module), flow).fn
    with pytest.raises(ConfigError) as err:
        run(*args, root=str(tmp_path / "quik"))
    assert err.value.field == "root" and "flow's `root` parameter" in err.value.fix
    assert "--params" not in str(err.value)
