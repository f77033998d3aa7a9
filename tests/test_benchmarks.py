"""The step benchmark runs against the loop it measures (it broke once, silently, when the
loop's sampler moved into Trainer.batches)."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_step_overhead_times_both_kinds_of_step_side_by_side(monkeypatch):
    monkeypatch.chdir(ROOT)  # the benchmark reads the project's params.yaml
    bench = _load("step_overhead")
    params = bench.load_params()
    result = bench.time_side_by_side("default", params.base, torch.device("cpu"), 4, 2)
    assert result["dp_step_s"] > 0 and result["nonprivate_step_s"] > 0
    assert math.isclose(result["time_ratio"], result["dp_step_s"] / result["nonprivate_step_s"])
    assert math.isclose(
        result["opacus_time_ratio"], result["dp_opacus_step_s"] / result["nonprivate_step_s"]
    )
    # the third step differs from the first in who computes the per-sample gradients alone
    from opacus import GradSampleModule

    cpu = torch.device("cpu")
    ours = bench.Stepper("dp", "default", params.base, cpu, 4, 1).trainer
    theirs = bench.Stepper("dp", "default", params.base, cpu, 4, 1, overrides=bench.OPACUS).trainer
    assert ours.forward is ours.model and ours.engine._lora_hooks is not None
    assert isinstance(theirs.forward, GradSampleModule) and theirs.engine._lora_hooks is None


def test_the_smollm2_shape_row_has_smollm2s_adapters_at_a_tiny_width(monkeypatch):
    """The launch-bound row: SmolLM2's 30 layers x seven projections (210 adapters, 420 LoRA
    matrices) with tensors too small to cost anything but what is done per tensor."""
    monkeypatch.chdir(ROOT)
    bench = _load("step_overhead")
    params = bench.load_params()
    model, vocab, length = bench.make_model(bench.SMOLLM2_SHAPE, params.base, params.finetune.lora)
    assert (vocab, length, model.config.hidden_size) == (512, 16, 18)
    adapters = [n for n, _ in model.named_modules() if n.endswith("lora_A.default")]
    assert len(adapters) == 210 and sum(p.numel() for p in model.parameters()) < 2_000_000
    result = bench.time_side_by_side(bench.SMOLLM2_SHAPE, params.base, torch.device("cpu"), 4, 1)
    assert result["dp_step_s"] > 0 and result["nonprivate_step_s"] > 0


def test_every_benchmark_imports_against_the_current_package(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        if path.stem == "common":
            continue
        assert callable(getattr(_load(path.stem), "main", None)), path.name
        # run as a script (make bench-*), not only importable: it once lost its entry point
        assert 'if __name__ == "__main__":\n    main()' in path.read_text(), path.name


def test_rldp_step_ratio_prefers_the_timed_loop_and_reads_older_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load("rldp_vs_dpsgd")
    new = {"loop_seconds_per_step": 1.2, "loop_cpu_seconds_per_step": 1.0,
           "seconds_per_step": 9.0, "cpu_seconds_per_step": 9.0}  # fmt: skip
    base = {"loop_seconds_per_step": 1.0, "loop_cpu_seconds_per_step": 0.8,
            "seconds_per_step": 3.0, "cpu_seconds_per_step": 2.0}  # fmt: skip
    assert bench.step_ratio(new, base) == 1.2 and bench.step_ratio(new, base, cpu=True) == 1.25
    old = {"seconds_per_step": 6.0, "cpu_seconds_per_step": 3.0}  # saved before the loop timer
    assert bench.step_ratio(old, base) == 2.0 and bench.step_ratio(old, base, cpu=True) == 1.5


def test_the_learning_rate_is_chosen_on_validation_not_test_perplexity(monkeypatch):
    """dp_learning_rate picks the least validation perplexity (the first on a tie) and marks it;
    the test perplexity is only reported: choosing on it would fit the test set."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load("dp_learning_rate")
    row = {"epsilon_spent": 7.99, "steps": 30, "loop_cpu_seconds_per_step": 20.0}
    runs = [
        row | {"lr": 0.01, "options": {"clip": 1.0}, "valid_perplexity": 25.0,
               "test_perplexity": 20.0},
        row | {"lr": 0.003, "options": {"clip": 1.0}, "valid_perplexity": 9.0,
               "test_perplexity": 30.0},
        row | {"lr": 0.001, "options": {"clip": 0.1}, "valid_perplexity": 9.0,
               "test_perplexity": 8.0},
    ]  # fmt: skip
    assert bench.chosen(runs)["lr"] == 0.003
    table = bench.markdown(runs)
    assert "| 1 | 0.003 (chosen) | 30.00 | 9.00 | 7.99 | 30 | 20.0 |" in table
    assert "| 0.1 | 0.001 | 8.00 | 9.00 |" in table
    assert table.count("(chosen)") == 1
    # a method without a clip option (auto_s) is shown, not a formatting error
    unclipped = row | {"lr": 0.01, "options": {"gamma": 0.01}, "valid_perplexity": 30.0,
                       "test_perplexity": 31.0}  # fmt: skip
    assert "| – | 0.01 (chosen) | 31.00 | 30.00 |" in bench.markdown([unclipped])


def test_the_batch_grid_reads_its_pairs_and_chooses_on_validation(monkeypatch):
    """dp_batch_size: BATCH:RATE pairs from the command line (a clear error otherwise), the
    pair of least validation perplexity marked, the noise multiplier and q shown per batch."""
    import argparse

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load("dp_batch_size")
    assert bench.pair("64:0.02") == (64, 0.02)
    for bad in ("64", "0.02:64", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError, match="BATCH:RATE"):
            bench.pair(bad)
    row = {"epsilon_spent": 7.99, "loop_cpu_seconds_per_step": 20.0}
    runs = [
        row | {"batch_size": 16, "sample_rate": 0.0667, "lr": 0.01, "steps": 30,
               "noise_multiplier": 0.64, "valid_perplexity": 25.9, "test_perplexity": 25.3},
        row | {"batch_size": 64, "sample_rate": 0.2667, "lr": 0.02, "steps": 8,
               "noise_multiplier": 1.31, "valid_perplexity": 20.1, "test_perplexity": 26.0},
    ]  # fmt: skip
    table = bench.markdown(runs)
    assert "| 64 | 0.267 | 0.02 (chosen) | 8 | 1.31 | 26.00 | 20.10 | 7.99 | 20.0 |" in table
    assert "| 16 | 0.067 | 0.01 | 30 | 0.64 | 25.30 | 25.90 |" in table


def test_adding_runs_keeps_only_other_rate_and_clip_pairs_of_the_same_setup(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load("dp_learning_rate")
    setup = {"profile": "p", "method": "dpsgd", "epochs": 2.0, "seed": 0}
    path = tmp_path / "dp_learning_rate.json"
    runs = [
        {"lr": lr, "options": {"clip": c}} for lr, c in [(0.01, 1.0), (0.003, 1.0), (0.01, 0.1)]
    ]
    path.write_text(json.dumps(setup | {"runs": runs}))
    kept = bench.kept_runs(path, setup, [(0.003, 1.0), (0.01, 0.1), (0.03, 1.0)])
    assert kept == [{"lr": 0.01, "options": {"clip": 1.0}}]
    assert bench.kept_runs(tmp_path / "none.json", setup, [(0.01, 1.0)]) == []
    with pytest.raises(SystemExit, match="another setup"):
        bench.kept_runs(path, setup | {"seed": 1}, [(0.03, 1.0)])


@pytest.mark.slow
def test_step_overhead_measures_smollm2s_architecture_without_its_package(monkeypatch, tmp_path):
    """--smollm2-weights random (the GPU machines, where the GGUF cannot travel): the timing and
    both memory children run SmolLM2-135M's architecture at the asked tokens per record."""
    monkeypatch.chdir(ROOT)
    bench = _load("step_overhead")
    monkeypatch.setattr(bench, "smollm2_dir", lambda: pytest.fail("the GGUF was asked for"))
    model, vocab, length = bench.make_model(
        "smollm2-random", None, bench.load_params().finetune.lora, 12
    )
    assert (vocab, length) == (49_152, 12)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) == 134_515_008
    row = bench.measure("smollm2-random", torch.device("cpu"), 2, 1, length=12)
    assert (row["seq_len"], row["weights"]) == (12, "random (its architecture)")
    assert row["dp_peak_bytes"] > 0 and row["nonprivate_peak_bytes"] > 0


def test_the_sweep_benchmark_resumes_with_the_sides_it_has(monkeypatch, tmp_path):
    """A run cut short keeps each finished side in <out>.partial.json; --resume measures only
    the missing side and writes the comparison; a partial of another sweep is refused."""
    bench = _load("sweep_fanout")
    measured = []

    def side(name, runner, threads, project, work, args, sweep):
        measured.append(name)
        spent = {"metrics/finetune-dpsgd.json": {"epsilon": 1.0}}
        return {
            "runner": runner,
            "seconds": {"ray": 60.0, "sequential": 90.0}[name],
            "mlflow_finetune_runs": [["1.0", "0", "FINISHED"]],
            "experiments": {"eps1-seed0": spent},
        }

    monkeypatch.setattr(bench, "measure_side", side)
    monkeypatch.setattr(bench, "measure_in_turn", lambda *a, progress, save: side(*a))
    monkeypatch.setattr(bench, "build_project", lambda *a: tmp_path / "project")
    out = tmp_path / "sweep.json"
    args = bench.argparse.Namespace(
        size="tiny", methods=["dpsgd"], epsilons=[1.0], seeds=[0], concurrency=2,
        one_thread_sequential=False, out=out, resume=True,
    )  # fmt: skip
    partial = out.with_suffix(".partial.json")
    ray = side("ray", {"kind": "ray"}, 1, None, None, args, None)
    partial.write_text(json.dumps({"sweep": bench._what(args), "sides": {"ray": ray}}))
    measured.clear()
    bench.run(args, tmp_path / "work", sweep=None)
    result = json.loads(out.read_text())
    assert measured == ["sequential"] and not partial.exists()
    assert result["speedup"] == 1.5 and result["same_epsilons_both_ways"]
    assert result["ray"]["seconds"] == 60.0 and "experiments" not in result["ray"]

    other = bench.argparse.Namespace(**{**vars(args), "seeds": [0, 1]})
    partial.write_text(json.dumps({"sweep": bench._what(args), "sides": {"ray": ray}}))
    with pytest.raises(SystemExit, match="holds another sweep"):
        bench.run(other, tmp_path / "work2", sweep=None)


def test_the_sweep_benchmarks_in_turn_side_resumes_point_by_point(monkeypatch, tmp_path):
    """A sitting cut short mid-way keeps the in-turn points it finished in <out>.partial.json;
    the next sitting runs only the others, and the side's time is the sum of its points', with
    each point's own MLflow runs and experiment and each sitting's calibration."""
    bench = _load("sweep_fanout")
    store: list[list[str]] = []  # the copy's MLflow fine-tuning runs
    shown: dict[str, dict] = {}  # its DVC experiments
    ran: list[tuple[float, int]] = []
    stop_at = {"eps8-seed0"}

    def sweep(root, epsilons, seeds):
        [(eps, seed)] = [(e, s) for e in epsilons for s in seeds]
        name = f"eps{eps:g}-seed{seed}"
        if name in stop_at:
            raise KeyboardInterrupt  # the sitting ends here
        ran.append((eps, seed))
        store.extend([[str(eps), str(seed), "FINISHED"]] * 2)  # two methods a point
        shown[name] = {"metrics/finetune-dpsgd.json": {"epsilon": eps * 0.999}}

    monkeypatch.setattr(bench, "side_copy", lambda *a: tmp_path / "copy")
    monkeypatch.setattr(bench, "build_project", lambda *a: tmp_path / "project")
    monkeypatch.setattr(bench, "finetune_runs", lambda copy: sorted(store))
    monkeypatch.setattr(bench, "experiments", lambda copy: dict(shown))
    monkeypatch.setattr(bench, "calibrate", lambda: 1.5)
    ray = {
        "runner": {"kind": "ray"}, "seconds": 10.0,
        "mlflow_finetune_runs": [[str(e), "0", "FINISHED"] for e in (1.0, 1.0, 8.0, 8.0)],
        "experiments": {
            "eps1-seed0": {"metrics/finetune-dpsgd.json": {"epsilon": 0.999}},
            "eps8-seed0": {"metrics/finetune-dpsgd.json": {"epsilon": 8 * 0.999}},
        },
    }  # fmt: skip
    out = tmp_path / "sweep.json"
    args = bench.argparse.Namespace(
        size="tiny", methods=["dpsgd", "nonprivate"], epsilons=[1.0, 8.0], seeds=[0],
        concurrency=2, one_thread_sequential=False, out=out, resume=True,
    )  # fmt: skip
    partial = out.with_suffix(".partial.json")
    partial.write_text(json.dumps({"sweep": bench._what(args), "sides": {"ray": ray}}))

    with pytest.raises(KeyboardInterrupt):
        bench.run(args, tmp_path / "work", sweep=sweep)
    kept = json.loads(partial.read_text())["in_progress"]["sequential"]
    assert list(kept["points"]) == ["eps1-seed0"] and len(kept["sittings"]) == 1
    assert kept["points"]["eps1-seed0"]["mlflow_finetune_runs"] == [["1.0", "0", "FINISHED"]] * 2
    assert not out.exists()

    stop_at.clear()
    store.clear()  # the next sitting builds a fresh project
    shown.clear()
    bench.run(args, tmp_path / "work2", sweep=sweep)
    assert ran == [(1.0, 0), (8.0, 0)]  # the first point was not run again
    result = json.loads(out.read_text())
    side = result["sequential"]
    assert side["seconds"] == round(sum(p["seconds"] for p in side["points"].values()), 1)
    assert [p["sitting"] for p in side["points"].values()] == [0, 1]
    assert [s["calibration_seconds"] for s in side["sittings"]] == [1.5, 1.5]
    assert len(side["mlflow_finetune_runs"]) == 4
    assert result["same_epsilons_both_ways"] and not partial.exists()


def _stage_project(tmp_path: Path, bench) -> Path:
    out = tmp_path / "project"
    (out / "logs").mkdir(parents=True)
    _, params = bench.run_params(ROOT, "quick", {})
    (out / "params.yaml").write_text(bench.yaml.safe_dump(params))
    return out


def test_profile_stages_skips_after_the_deadline_and_stops_at_the_hard_one(tmp_path):
    """A stage not started by the deadline is skipped; one still running at the hard deadline
    is stopped; a failed stage ends its method's chain, its log kept."""
    bench = _load("profile_stages")
    out = _stage_project(tmp_path, bench)
    late = bench.Clock(deadline=-1.0, hard_deadline=math.inf)
    assert not bench.run_stage(out, late, "prepare")
    assert late.records == [{"stage": "prepare", "status": "skipped (deadline)"}]
    assert not (out / "data").exists()

    stopped = bench.Clock(deadline=math.inf, hard_deadline=0.0)
    assert not bench.run_stage(out, stopped, "prepare")
    assert stopped.records[0]["status"] == "stopped (hard deadline)"
    assert stopped.records[0]["exit_code"] is None

    clock = bench.Clock(deadline=math.inf, hard_deadline=math.inf)
    bench.method_chain(out, clock, "dpsgd")  # nothing prepared: finetune fails, the rest waits
    [record] = clock.records
    assert record["stage"] == "finetune dpsgd" and record["status"].startswith("failed (exit 2")
    assert "missing prepared split" in (out / "logs" / "finetune-dpsgd.log").read_text()


def _fake_stages(monkeypatch, bench, failing: set[tuple[str, str | None]]) -> list:
    """run_stage replaced by a recorder (each stage 1 s; those in ``failing`` fail)."""
    ran = []

    def stage(out, clock, name, method=None):
        ran.append((name, method))
        ok = (name, method) not in failing
        record = {"stage": f"{name} {method}", "status": "ok" if ok else "failed (exit 2)"}
        clock.add(record | {"seconds": 1.0})
        return ok

    monkeypatch.setattr(bench, "run_stage", stage)
    monkeypatch.setattr(bench, "write_summary", lambda out: (out / "summary.md").write_text("|"))
    return ran


def _run_main(monkeypatch, bench, out: Path, *extra: str) -> None:
    argv = ["profile_stages.py", "quick", "--out", str(out), "--methods", "dpsgd", "nonprivate"]
    monkeypatch.setattr(sys, "argv", [*argv, *extra])
    bench.main()


def test_profile_stages_runs_prepare_and_base_then_each_methods_chain(monkeypatch, tmp_path):
    bench = _load("profile_stages")
    ran = _fake_stages(monkeypatch, bench, failing=set())
    out = tmp_path / "all"
    _run_main(monkeypatch, bench, out, "--lanes", "2", "--set", "finetune.lr=0.02")
    assert ran[:2] == [("prepare", None), ("base", None)]
    for method in ("dpsgd", "nonprivate"):  # each method's stages in order, whatever the lanes
        assert [s for s in ran if s[1] == method] == [(st, method) for st in bench.METHOD_STAGES]
    result = json.loads((out / "stage_times.json").read_text())
    assert result["complete"] and result["lanes"] == 2 and result["stage_seconds_sum"] == 8.0
    assert result["methods"] == ["dpsgd", "nonprivate"]
    assert result["overrides"] == {"finetune.lr": 0.02}
    params = bench.yaml.safe_load((out / "params.yaml").read_text())
    assert list(params["methods"]) == ["dpsgd", "nonprivate"]
    assert params["finetune"]["lr"] == 0.02
    assert params["registry"]["name"].endswith("-quick")
    assert (out / "summary.md").read_text() == "|"


def test_profile_stages_stops_a_chain_at_its_failure_and_says_so(monkeypatch, tmp_path):
    """A failed stage ends its method's chain and the run's exit status; a failed base runs no
    method stage at all and records each as not run."""
    bench = _load("profile_stages")
    ran = _fake_stages(monkeypatch, bench, failing={("evaluate", "dpsgd")})
    with pytest.raises(SystemExit, match="evaluate dpsgd"):
        _run_main(monkeypatch, bench, tmp_path / "evaluate")
    assert [s for s in ran if s[1] == "dpsgd"] == [("finetune", "dpsgd"), ("evaluate", "dpsgd")]
    assert len([s for s in ran if s[1] == "nonprivate"]) == 3
    result = json.loads((tmp_path / "evaluate" / "stage_times.json").read_text())
    assert not result["complete"] and result["stage_seconds_sum"] == 6.0

    ran = _fake_stages(monkeypatch, bench, failing={("base", None)})
    with pytest.raises(SystemExit, match="base"):
        _run_main(monkeypatch, bench, tmp_path / "base")
    assert ran == [("prepare", None), ("base", None)]
    result = json.loads((tmp_path / "base" / "stage_times.json").read_text())
    not_run = [r["stage"] for r in result["stages"] if r["status"].startswith("not run")]
    assert len(not_run) == 6 and "attack nonprivate" in not_run


def test_profile_stages_refuses_unknown_methods_and_an_existing_project(monkeypatch, tmp_path):
    bench = _load("profile_stages")
    _fake_stages(monkeypatch, bench, failing=set())
    with pytest.raises(SystemExit):
        _run_main(monkeypatch, bench, tmp_path / "x", "--methods", "dpsgd", "nosuch")
    assert not (tmp_path / "x").exists()
    (tmp_path / "y").mkdir()
    with pytest.raises(SystemExit):
        _run_main(monkeypatch, bench, tmp_path / "y")
    assert not (tmp_path / "y" / "stage_times.json").exists()


def test_the_step_benchmark_profiles_the_dp_step(monkeypatch):
    monkeypatch.chdir(ROOT)
    bench = _load("step_overhead")
    table = bench.profile_dp_step("default", torch.device("cpu"), 4, 384)
    assert table.startswith("DP step of default on cpu, batch 4")
    assert "sorted by self_cpu_time_total" in table and "aten::" in table


@pytest.mark.slow
def test_the_gpu_step_probe_runs_its_variants_and_phases(tmp_path):
    """The probe the next GPU session runs first (scripts/device_check.sh) still runs: here on
    the CPU, at a tiny size."""
    import subprocess

    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_step_probe.py"), "--device", "cpu",
         "--batch", "2", "--length", "8", "--steps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dp, fixed B" in done.stdout and "dp, precision fp32" in done.stdout
    assert "phases of dp (ms per step, 8 steps)" in done.stdout and "add_noise" in done.stdout


@pytest.mark.slow
def test_the_ddp_benchmark_times_one_process_and_two_ranks_on_the_same_batches(tmp_path):
    """make bench-ddp at its smallest: three sides, the same logical batches and losses, the
    two ranks' collectives timed."""
    import subprocess

    out = tmp_path / "ddp.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "ddp_scaling.py"), "--configs"]
    command += ["default", "--rounds", "2", "--steps", "2", "--batch", "4", "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, timeout=600)
    (run,) = json.loads(out.read_text())["runs"]
    assert run["rounds"] == 2 and len(run["records_per_step"]) == 2
    assert run["largest_loss_difference"] <= 1e-4
    two = run["two_processes_one_thread_each"]
    assert (two["processes"], two["threads_per_process"]) == (2, 1)
    assert 0 < two["collective_share"] < 1
    assert run["one_process_two_threads"]["collective_share"] == 0
    assert len(two["round_medians_s"]) == 2
    one_s, two_s = run["one_process_two_threads"]["median_step_s"], two["median_step_s"]
    ratio = one_s / two_s
    # the medians are stored to 4 decimals and the speedup to 3: the bound both roundings allow
    rounding = ratio * (5e-5 / one_s + 5e-5 / two_s) + 5e-4
    assert run["speedup_over_one_process"] == pytest.approx(ratio, abs=rounding + 1e-9)


def test_the_ddp_benchmark_stops_when_the_sides_ran_different_steps(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load("ddp_scaling")
    same = {"records": [3, 5], "losses": [2.0, 1.5]}
    close = {"records": [3, 5], "losses": [2.0, 1.5 * (1 + 1e-6)]}
    assert bench.loss_difference({"a": same, "b": close}, "x") == pytest.approx(1e-6, rel=1e-3)
    with pytest.raises(SystemExit, match="different logical batches"):
        bench.loss_difference({"a": same, "b": {"records": [3, 4], "losses": [2.0, 1.5]}}, "x")
    with pytest.raises(SystemExit, match="losses differ"):
        bench.loss_difference({"a": same, "b": {"records": [3, 5], "losses": [2.0, 1.6]}}, "x")
    nan = {"records": [3, 5], "losses": [2.0, float("nan")]}
    with pytest.raises(SystemExit, match="losses differ"):
        bench.loss_difference({"a": same, "b": nan}, "x")


def test_lmo_clip_is_chosen_on_validation_and_every_clip_is_shown(monkeypatch):
    """lmo_vs_gaussian --lmo-clips keeps the LMO run of least validation perplexity (not
    test: that would fit the test set) and names every clip it ran."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load("lmo_vs_gaussian")
    paper = {"per_step_epsilon": 1.3, "gaussian_proxy_epsilon": 0.18}
    run = {"epsilon_spent": 0.99, "paper_accounting_not_a_guarantee": paper}
    runs = [
        run | {"options": {"clip": 0.1}, "valid_perplexity": 500.0, "test_perplexity": 400.0},
        run | {"options": {"clip": 1.0}, "valid_perplexity": 450.0, "test_perplexity": 470.0},
        run | {"options": {"clip": 10.0}, "valid_perplexity": 450.0, "test_perplexity": 460.0},
    ]
    assert bench.chosen_clip(runs)["options"]["clip"] == 1.0  # the first of a tie
    assert bench.chosen_clip([]) is None
    gaussian = {"test_perplexity": 235.0, "epsilon_spent": 1.0}
    row = {"epsilon": 1.0, "gaussian": gaussian, "lmo": runs[1], "lmo_runs": runs,
           "ppl_ratio": 470.0 / 235.0}  # fmt: skip
    assert "| 1 | 235 | 470 | 1 (0.1, 1, 10) | 2 | 1 | 0.99 | 1.3 / 0.18 |" in bench.markdown([row])
    infeasible = {"epsilon": 0.1, "gaussian": gaussian, "lmo": None, "lmo_runs": [],
                  "lmo_infeasible": "infeasible for sound LMO (extended grid): x"}  # fmt: skip
    assert "| 0.1 | 235 | infeasible | - () | - | 1 | - |" in bench.markdown([infeasible])


def test_the_methods_grid_pairs_each_method_with_dpsgd_by_seed(monkeypatch):
    """Ratios to DP-SGD are per (ε, seed) pair, then averaged; the non-private model claims no
    ε; the table shows the largest ε any run spent, and a missing point as '-'."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load("methods_grid")

    def run(entry, eps, seed, ppl, spent=None, accuracy=0.1):
        return {"entry": entry, "method": entry, "epsilon": eps, "seed": seed,
                "test_perplexity": ppl, "epsilon_spent": spent,
                "medication_accuracy": accuracy, "seconds_per_step": 0.5}  # fmt: skip

    runs = [
        run("nonprivate", None, 0, 100.0), run("nonprivate", None, 1, 110.0),
        run("dpsgd", 1.0, 0, 200.0, 1.0), run("dpsgd", 1.0, 1, 300.0, 0.999),
        run("dpsgd", 4.0, 0, 150.0, 4.0), run("dpsgd", 4.0, 1, 160.0, 4.0),
        run("auto_s", 1.0, 0, 190.0, 0.98), run("auto_s", 1.0, 1, 270.0, 1.0, 0.2),
        run("auto_s", 4.0, 0, 150.0, 3.9),  # seed 1 at ε 4 did not run
    ]  # fmt: skip
    rows = {(r["entry"], r["epsilon"]): r for r in bench.summarise(runs, [4.0, 1.0], [0, 1])}
    assert rows[("nonprivate", None)]["test_perplexity_mean"] == 105.0
    assert "ppl_ratio_to_dpsgd_mean" not in rows[("nonprivate", None)]
    auto = rows[("auto_s", 1.0)]
    # (190/200 + 270/300) / 2 = 0.925, not 460/500 = 0.92 (means of unpaired perplexities)
    assert auto["ppl_ratio_to_dpsgd_mean"] == pytest.approx(0.925)
    assert auto["max_epsilon_spent"] == 1.0 and auto["seeds"] == 2
    assert rows[("auto_s", 4.0)]["seeds"] == 1
    assert rows[("auto_s", 4.0)]["ppl_ratio_to_dpsgd_mean"] == pytest.approx(1.0)
    table = bench.markdown(list(rows.values())).splitlines()
    assert table[0].startswith("| method | ε = 1 | ε = 4 | / DP-SGD at ε 1, 4 (mean ± sd)")
    lines = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert "| 105.0 ± 7.1 (no ε) |" in lines["nonprivate"]
    assert "| 1 | 1.000, 4.000 | 0.100 |" in lines["dpsgd"]
    assert "0.925 ± 0.035; 1.000 ± 0.000" in lines["auto_s"]
    assert lines["auto_s"].endswith("| 1.000, 3.900 | 0.150, 0.100 |")  # one per ε, in order
    del rows[("auto_s", 1.0)]  # a point that did not run: '-' in its place, the others kept
    line = bench.markdown(list(rows.values())).splitlines()[-1]
    assert line.startswith("| auto_s | - | 150.0 ± 0.0 |")
    assert line.endswith("| -, 3.900 | -, 0.100 |")
    assert lines["nonprivate"].endswith("| - | 0.100 |")  # the same at every ε: once


def _rldp_pair(seed: int, nll: tuple[list[float], list[float]], tokens: list[float]) -> list:
    """DP-SGD's and RLDP's run at one seed, each with its test notes' summed NLL and tokens."""
    runs = []
    for method, sums in zip(("dpsgd", "rldp"), nll, strict=True):
        ppl = math.exp(sum(sums) / sum(tokens))
        runs.append({
            "method": method, "epsilon": 8.0, "seed": seed, "test_perplexity": ppl,
            "medication_accuracy": 0.1, "curve": [(1, 3.0)], "steps": 1, "epsilon_spent": 8.0,
            "loop_seconds_per_step": 1.0, "seconds_per_step": 1.0, "cpu_seconds_per_step": 1.0,
            "record_scores": {"test_perplexity": {
                "numerators": sums, "denominators": tokens, "exponentiate": True}},
        })  # fmt: skip
    return runs


def test_rldp_against_dpsgd_pairs_each_seeds_runs_over_the_same_test_notes(monkeypatch):
    """Per seed, RLDP minus DP-SGD with its paired interval over the notes: a gap every note
    shares is beyond the notes' noise; older runs without per-note scores still summarise."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load("rldp_vs_dpsgd")
    tokens = [100.0, 80.0, 120.0, 90.0, 110.0, 100.0]
    dpsgd = [300.0, 250.0, 380.0, 270.0, 330.0, 310.0]
    better = [s - 0.2 * t for s, t in zip(dpsgd, tokens, strict=True)]  # lower NLL on every note
    mixed = [s + (30.0 if i % 2 else -30.0) for i, s in enumerate(dpsgd)]  # up, down, up...
    runs = _rldp_pair(0, (dpsgd, better), tokens) + _rldp_pair(1, (dpsgd, mixed), tokens)
    (row,) = bench.summarise(runs, [8.0], [0, 1])
    first, second = row["paired"]
    assert first["seed"] == 0 and first["records"] == 6
    assert math.isclose(first["difference"], first["rldp_ppl"] - first["dpsgd_ppl"])
    assert first["low"] <= first["difference"] <= first["high"] < 0  # better beyond the noise
    assert second["low"] < 0 < second["high"]  # the notes disagree: not a difference
    table = bench.markdown([row])
    assert "| 8 | 0 |" in table and "(6 notes)" in table and f"{first['high']:+.2f}]" in table
    for run in runs:
        del run["record_scores"]
    (older,) = bench.summarise(runs, [8.0], [0, 1])
    assert older["paired"] == [] and "paired interval" not in bench.markdown([older])


def test_the_ablation_pairs_each_policy_variant_with_the_anchor_alone_at_its_seed(monkeypatch):
    """The policy's own effect: each variant with a policy minus the anchor alone at the same
    seed, paired over the notes; the anchor's own row, DP-SGD and older runs get none."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load("rldp_vs_dpsgd")
    tokens = [100.0, 80.0, 120.0, 90.0]
    base = [300.0, 250.0, 380.0, 270.0]
    worse = [s + 0.1 * t for s, t in zip(base, tokens, strict=True)]  # higher on every note
    runs = []
    for key, sums in (("anchor", base), ("full", worse)):
        (run,) = [r for r in _rldp_pair(3, (base, sums), tokens) if r["method"] == "rldp"]
        run["controller_metrics"] = {"rldp/policy_actions": 7.0 if key == "full" else 0.0}
        runs.append({**run, "variant": bench.ABLATION[key][0]})
    (dpsgd, _) = _rldp_pair(3, (base, base), tokens)
    runs.insert(0, {**dpsgd, "variant": "DP-SGD"})
    table = bench.ablation_markdown(runs, [8.0], [3])
    lines = [line for line in table.splitlines() if line.startswith("| 8 | anchor + policy")]
    effect = lines[-1]  # the summary row first, then the paired one
    assert len(lines) == 2 and "| 3 | 7 |" in effect and "(4 notes) |" in effect
    low, high = (float(x) for x in effect.split("[")[1].split("]")[0].split(", "))
    assert 0 < low <= high  # worse than the anchor on every note: beyond the notes' noise
    assert not any(line.startswith("| 8 | anchor alone (per-adapter AUTO-S, paced noise) | 3 |")
                   for line in table.splitlines())  # fmt: skip
    for run in runs:
        del run["record_scores"]
    assert "paired interval" not in bench.ablation_markdown(runs, [8.0], [3])


def test_reuse_takes_only_runs_whose_options_resolve_to_the_same(monkeypatch):
    """--reuse compares options with their defaults filled in: a run made under an earlier
    default (the DP norm histogram on) is not taken for today's run of the same written
    options, and a run that recorded no resolved options is never taken."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load("rldp_vs_dpsgd")
    options = {"rl_interval": 5}
    today = bench.resolved_options("rldp", options)
    assert today["norm_levels"] == [] and today["rl_interval"] == 5
    run = {"method": "rldp", "options": options, "epsilon": 4.0, "seed": 1, "epochs": 10.0}
    before = {**run, "resolved_options": {**today, "norm_levels": [0.5, 1.0, 2.0]}}
    now = {**run, "resolved_options": today}
    reusable = functools.partial(bench._reusable, source={}, any_source=True)
    assert reusable([run, before], "rldp", options, 4.0, 1, 10.0) is None
    assert reusable([run, before, now], "rldp", options, 4.0, 1, 10.0) is now
    assert reusable([now], "rldp", options, 4.0, 2, 10.0) is None  # another seed
    assert reusable([now], "rldp", options, 4.0, 1, 3.0) is None  # another length
    histogram = {"rl_interval": 5, "norm_levels": [0.5, 1.0, 2.0]}
    assert reusable([before], "rldp", histogram, 4.0, 1, 10.0) is before


def test_reuse_takes_only_runs_of_the_same_committed_code(monkeypatch, tmp_path):
    """A run records git's hashes of src/ and benchmarks/common.py; --reuse takes it only while
    they are today's and neither tree had uncommitted changes (a changed behaviour keeps every
    option: only the code tells)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load("rldp_vs_dpsgd")
    common = sys.modules["common"]
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "benchmarks").mkdir()
    (repo / "src" / "mechanism.py").write_text("NOISE = 1.0\n")
    (repo / "benchmarks" / "common.py").write_text("# helpers\n")
    (repo / "README.md").write_text("words\n")

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                       check=True, capture_output=True)  # fmt: skip

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    first = common.source_version(repo)
    assert not first["dirty"] and set(first["paths"]) == {"src", "benchmarks/common.py"}
    assert all(first["paths"].values())
    (repo / "README.md").write_text("other words\n")  # not code: the same source
    git("commit", "-qam", "docs")
    docs = common.source_version(repo)
    assert docs["commit"] != first["commit"] and docs["paths"] == first["paths"]
    assert common.same_source({"source": first}, docs)
    (repo / "src" / "mechanism.py").write_text("NOISE = 2.0\n")
    dirty = common.source_version(repo)
    assert dirty["dirty"] and not common.same_source({"source": first}, dirty)
    git("commit", "-qam", "behaviour")
    changed = common.source_version(repo)
    assert not changed["dirty"] and changed["paths"]["src"] != first["paths"]["src"]
    assert not common.same_source({"source": first}, changed)
    assert not common.same_source({"source": dirty}, dirty)  # a dirty run: never reused
    assert not common.same_source({}, changed)  # unrecorded: never reused

    options = {"rl_interval": 5}
    run = {"method": "rldp", "options": options, "epsilon": 4.0, "seed": 1, "epochs": 10.0,
           "resolved_options": bench.resolved_options("rldp", options)}  # fmt: skip
    old, new = {**run, "source": first}, {**run, "source": changed}
    assert bench._reusable([old], "rldp", options, 4.0, 1, 10.0, source=changed) is None
    assert bench._reusable([old, new], "rldp", options, 4.0, 1, 10.0, source=changed) is new
    # --reuse-any-source: any code, and the caller marks the run
    assert (
        bench._reusable([old], "rldp", options, 4.0, 1, 10.0, source=changed, any_source=True)
        is old
    )
    # ... but today's code first, wherever it is in the file
    assert (
        bench._reusable([old, new], "rldp", options, 4.0, 1, 10.0, source=changed, any_source=True)
        is new
    )
