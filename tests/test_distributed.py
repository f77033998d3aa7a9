"""One DP run across processes (gloo, 2 ranks on the CPU): the same logical batch, the noise
added once, the same ledger as one process, every rank on the same admitted action."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from privtune.privacy.action import Action
from privtune.privacy.distributed import Replica
from privtune.privacy.mechanisms import Gaussian
from privtune.privacy.mechanisms.gaussian import GaussianSpec
from privtune.train import Checkpointing
from tests.conftest import free_port

WORLD = 2


def _join(rank: int, port: int) -> None:
    # A bounded wait: gloo's default is 30 min, and a connection between the ranks that never
    # completes (seen once here, both ranks inside ProcessGroupGloo's constructor on a loaded
    # machine) would hold CI that long instead of failing this test.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=120),
    )


def _records(n: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return model, torch.randn(n, 4) * 3, torch.randn(n, 2)


def _release(model, x, y, std: float, replica: Replica, zero_grads: bool = False):
    """Clip the rows of (x, y) this replica owns; release with per-group noise std `std`."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    params = list(gsm.parameters())
    half = len(params) // 2
    mech = Gaussian([params[:half], params[half:]], ["first", "second"], seed=7)
    mech.replica = replica
    spec = GaussianSpec(Action((0.5, 0.2), 1.0), 1.0, (std, std), None, 1)
    mine = replica.share(torch.arange(len(x)))
    if len(mine):
        loss = ((gsm(x[mine]) - y[mine]) ** 2).sum()
        (loss * 0 if zero_grads else loss).backward()
        mech.accumulate(spec)
    stats = mech.release(spec, 5.0, len(x))
    return [p.grad.clone() for p in params], stats


def _mechanism_worker(rank: int, port: int, out: str) -> None:
    _join(rank, port)
    model, x, y = _records()
    grads, stats = _release(model, x, y, 0.0, Replica.current())  # zero noise
    big = torch.nn.Linear(500, 400)  # 200k coordinates of noise on zero gradients
    noisy, _ = _release(big, torch.zeros(3, 500), torch.zeros(3, 400), 2.0, Replica.current(), True)
    torch.save(
        {
            "grads": grads,
            "norms": stats.norms,
            "clipped": stats.clipped_fraction,
            "noise": noisy[0],
        },
        f"{out}/rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_two_ranks_release_the_single_process_update_with_the_noise_added_once(tmp_path):
    mp.spawn(_mechanism_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model, x, y = _records()
    single, stats = _release(model, x, y, 0.0, Replica())
    for rank in ranks:  # every rank holds the global, clipped, summed update
        for a, b in zip(rank["grads"], single, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert sorted(rank["norms"][:, 0].tolist()) == pytest.approx(
            sorted(stats.norms[:, 0].tolist()), rel=1e-5
        )
        assert rank["clipped"] == stats.clipped_fraction
    # the noise enters once: std 2 over the expected batch 5, not sqrt(2) times more
    assert torch.equal(ranks[0]["noise"], ranks[1]["noise"])
    assert float(ranks[0]["noise"].std()) == pytest.approx(2.0 / 5.0, rel=0.01)


def _lifecycle_worker(rank: int, ports: list[int], out: str) -> None:
    from privtune.privacy.distributed import process_group_from_environment

    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ports[0]), "RANK": str(rank)}
        | {"LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD)}
    )
    seen = {}
    with process_group_from_environment() as replica:
        seen["inside"] = (dist.is_initialized(), replica.rank, replica.world_size)
    seen["left"] = dist.is_initialized()
    os.environ["MASTER_PORT"] = str(ports[1])
    try:  # an error inside the block leaves the group too
        with process_group_from_environment():
            raise RuntimeError("a stage failed")
    except RuntimeError:
        seen["left_on_error"] = dist.is_initialized()
    _join(rank, ports[2])  # a group the caller joined stays the caller's
    with process_group_from_environment() as replica:
        seen["theirs"] = replica.world_size
    seen["theirs_kept"] = dist.is_initialized()
    dist.destroy_process_group()
    torch.save(seen, f"{out}/rank{rank}.pt")


def test_a_stage_leaves_the_process_group_it_joined_and_only_that(tmp_path):
    """Under torchrun a stage joins the group from the environment and leaves it at its end,
    error or not (a process exiting inside its group can abort in gloo, and NCCL warns)."""
    ports = [free_port() for _ in range(3)]
    mp.spawn(_lifecycle_worker, args=(ports, str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        assert seen == {
            "inside": (True, rank, WORLD),
            "left": False,
            "left_on_error": False,
            "theirs": WORLD,
            "theirs_kept": True,
        }


def _train_worker(
    rank: int, port: int, out: str, method: str, options: dict, secret: bool = False
) -> None:
    _join(rank, port)
    result, state = _tiny_run(method, options, secret)
    decisions = [e.noise_multiplier for e in result.ledger.entries]
    torch.save(
        {
            "ledger": result.ledger.state_dict(),
            "epsilon": result.epsilon,
            "steps": result.steps_taken,
            "state": state,
            "decisions": decisions,
        },
        f"{out}/rank{rank}.pt",
    )
    dist.destroy_process_group()


def _tiny_run(method: str, options: dict, secret: bool = False, **run):
    from privtune.config import BaseParams
    from privtune.data.tokenization import train_tokenizer
    from privtune.modeling import attach_lora, build_gpt2
    from tests.conftest import synthetic_texts
    from tests.test_train import PARAMS, _data, _lora_state

    tokenizer = train_tokenizer(synthetic_texts(300), 320)
    torch.manual_seed(0)
    base = build_gpt2(
        BaseParams(n_layer=1, n_head=2, n_embd=32, max_length=64),
        len(tokenizer),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    train_data, valid_data = _data(tokenizer)
    params = PARAMS.model_copy(update={"audit_canaries": 16, "epochs": 0.6, "secret_noise": secret})
    model = attach_lora(copy.deepcopy(base), params.lora)
    from privtune.train import train

    result = train(
        model, train_data, valid_data, params, method, options, show_progress=False, **run
    )
    return result, _lora_state(model)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "options"), [("dpsgd", {}), ("rldp", {"rl_interval": 2})])
def test_two_ranks_spend_what_one_process_spends_and_act_alike(tmp_path, method, options):
    mp.spawn(
        _train_worker,
        args=(free_port(), str(tmp_path), method, options),
        nprocs=WORLD,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    # every rank applied the same admitted actions and holds the same model
    assert ranks[0]["ledger"] == ranks[1]["ledger"]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value), name
    if method == "dpsgd":  # a schedule that does not depend on the data: the same as one process
        single, state = _tiny_run(method, options)
        assert ranks[0]["ledger"] == single.ledger.state_dict()
        assert (ranks[0]["epsilon"], ranks[0]["steps"]) == (single.epsilon, single.steps_taken)
        for name, value in state.items():
            torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_every_rank_draws_rank_0s_secret_seeds(tmp_path):
    """With secret seeds (the default) each rank would draw its own, so their Poisson masks
    and noise would differ; they take rank 0's, and hold one model: not the seeded run's."""
    mp.spawn(_train_worker, args=(free_port(), str(tmp_path), "dpsgd", {}, True), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert ranks[0]["ledger"] == ranks[1]["ledger"]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value), name
    _, seeded = _tiny_run("dpsgd", {})
    assert any(not torch.equal(ranks[0]["state"][n], seeded[n]) for n in seeded)


def _resume_worker(rank: int, port: int, out: str, secret: bool) -> None:
    """Each rank resumes from rank{rank}.pt: a missing file is another node's disk."""
    _join(rank, port)
    path = Path(out) / f"rank{rank}.pt"
    try:
        run = {"checkpoint": Checkpointing(path, every=2, key="same-inputs")}
        _tiny_run("dpsgd", {}, secret, **run)
        outcome = "trained"
    except RuntimeError as err:
        outcome = str(err)
    dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(outcome)


@pytest.mark.slow
@pytest.mark.parametrize("rank_1_finds", ["nothing", "another attempt's checkpoint"])
def test_ranks_that_would_resume_from_different_checkpoints_fail_together(tmp_path, rank_1_finds):
    """Rank 1 on a node without rank 0's checkpoint, or with the one an earlier attempt left at
    the same step (with secret seeds, other generator states): both ranks fail before a step."""
    from tests.test_resume import Crash

    attempts = [0] if rank_1_finds == "nothing" else [0, 1]
    for rank in attempts:  # one process's run each time, killed after its checkpoint
        with pytest.raises(KeyboardInterrupt):
            _tiny_run(
                "dpsgd",
                {},
                True,
                checkpoint=Checkpointing(tmp_path / f"rank{rank}.pt", every=2, key="same-inputs"),
                callbacks=[Crash(at=3)],
            )
    mp.spawn(_resume_worker, args=(free_port(), str(tmp_path), True), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        outcome = (tmp_path / f"rank{rank}.txt").read_text()
        assert "resume from different checkpoints" in outcome, outcome
        assert "(rank 0: step 2 of checkpoint " in outcome
        other = ", rank 1: step 2 of checkpoint"
        assert (", rank 1: none)" if rank_1_finds == "nothing" else other) in outcome, outcome


def _crash_or_resume_worker(rank: int, port: int, out: str, crash: bool) -> None:
    """Both ranks run with one checkpoint file (a shared disk): killed after step 3, or on."""
    from tests.test_resume import Crash

    _join(rank, port)
    run = {"checkpoint": Checkpointing(Path(out, "run.pt"), every=2, key="same-inputs")}
    try:
        result, state = _tiny_run("dpsgd", {}, callbacks=[Crash(at=3)] if crash else [], **run)
    except KeyboardInterrupt:  # the crash: what is left is the checkpoint
        pass
    else:
        saved = {"ledger": result.ledger.state_dict(), "state": state}
        torch.save(saved | {"resumed_at": result.resumed_at}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [(1, 2), (2, 1)])
def test_a_run_resumed_by_another_number_of_ranks_keeps_the_uninterrupted_ledger(tmp_path, ranks):
    """Killed with one process and resumed under torchrun with two, or the other way: the
    checkpoint holds the logical batches' state, not the ranks', so the resumed run's ledger is
    the uninterrupted run's and its adapter the same up to float sums in another order."""
    from tests.test_resume import Crash

    uninterrupted, expected = _tiny_run("dpsgd", {})
    run = {"checkpoint": Checkpointing(tmp_path / "run.pt", every=2, key="same-inputs")}
    killed, resumed_by = ranks
    if killed == 1:
        with pytest.raises(KeyboardInterrupt):
            _tiny_run("dpsgd", {}, callbacks=[Crash(at=3)], **run)
    else:
        mp.spawn(_crash_or_resume_worker, args=(free_port(), str(tmp_path), True), nprocs=WORLD)
    assert (tmp_path / "run.pt").is_file()
    if resumed_by == 1:
        result, state = _tiny_run("dpsgd", {}, **run)
        outcomes = [{"ledger": result.ledger.state_dict(), "state": state}]
        assert result.resumed_at == 2
    else:
        mp.spawn(_crash_or_resume_worker, args=(free_port(), str(tmp_path), False), nprocs=WORLD)
        outcomes = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
        assert [o["resumed_at"] for o in outcomes] == [2, 2]
    for outcome in outcomes:
        assert outcome["ledger"] == uninterrupted.ledger.state_dict()
        for name, value in expected.items():
            torch.testing.assert_close(outcome["state"][name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torchrun_finetune_stage_writes_the_single_process_ledger(tmp_path):
    """`torchrun --nproc_per_node 2 -m privtune.cli finetune dpsgd`: rank 0 writes the outputs
    and MLflow; the ledger is the single-process run's."""
    from privtune.cli import main
    from tests.conftest import write_params

    project = tmp_path / "project"
    project.mkdir()
    write_params(project / "params.yaml")
    assert main(["--root", str(project), "--no-progress", "prepare"]) == 0
    assert main(["--root", str(project), "--no-progress", "base"]) == 0
    single = tmp_path / "single"
    import shutil

    shutil.copytree(project, single)
    assert main(["--root", str(single), "--no-progress", "finetune", "dpsgd"]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own store
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "privtune.cli",
        "--root",
        str(project),
        "--no-progress",
        "finetune",
        "dpsgd",
    ]
    assert subprocess.run(command, env=env, cwd=project).returncode == 0
    read = lambda root: json.loads(Path(root, "models/dpsgd/ledger.json").read_text())  # noqa: E731
    assert read(project) == read(single)
    metrics = json.loads((project / "metrics" / "finetune-dpsgd.json").read_text())
    assert (
        metrics["epsilon"]
        == json.loads((single / "metrics" / "finetune-dpsgd.json").read_text())["epsilon"]
    )

    # The stage again, same inputs: rank 0 reuses the finished run, and the other rank must
    # learn so rather than wait for it in the first collective (it hung until the group's
    # timeout, or failed when rank 0 left the group).
    again = subprocess.run(
        command, env=env, cwd=project, capture_output=True, text=True, timeout=240
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "reusing finished MLflow run" in again.stderr
    assert read(project) == read(single)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_rank_is_stopped_when_its_launcher_is_killed(tmp_path):
    """torchrun starts its ranks in a session of their own: after `kill -9` of torchrun they
    trained on, unseen, and a restart beside them released a second model. A rank asks the
    kernel for SIGTERM when its launcher dies, which stops it as an interrupt."""
    import signal
    import time

    pid_file = tmp_path / "rank.pid"
    rank = (
        "import os, sys, time; from privtune.lifetime import stop_with_parent; "
        f"stop_with_parent(); open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
        "time.sleep(120)"
    )
    launcher = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {rank!r}], start_new_session=True); "
        "time.sleep(120)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    parent = subprocess.Popen([sys.executable, "-c", launcher], env=env)
    deadline = time.time() + 60
    while not (pid_file.is_file() and pid_file.read_text()):
        assert time.time() < deadline and parent.poll() is None, "the rank never started"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while Path(f"/proc/{child}").exists() and "Z" not in _state(child):
        assert time.time() < deadline, "the rank outlived its launcher"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
