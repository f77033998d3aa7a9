"""Progress where no terminal shows a bar (a Prefect worker's log, `dvc repro` piped): a plain
line at each tenth of a task on stderr, the command's JSON alone on stdout."""

import io
import json
import os
import re
import shutil

from rich.console import Console

from privtune.progress import LoggedProgress, progress_bar


def test_a_log_gets_a_line_at_each_tenth_of_a_task(capsys):
    with progress_bar(True) as progress:  # capsys' stderr is no terminal
        task = progress.add_task("finetune dpsgd", total=41, status="")
        for step in range(41):
            progress.update(task, status=f"loss {4 - step / 41:.3f}")
            progress.advance(task)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("finetune dpsgd: ")]
    done = [int(re.match(r"finetune dpsgd: (\d+)/41 ", line).group(1)) for line in lines]
    assert done == [5, 9, 13, 17, 21, 25, 29, 33, 37, 41]  # each tenth crossed, once
    assert lines[-1].startswith("finetune dpsgd: 41/41 (100%), ")
    assert "left" not in lines[-1] and "elapsed" in lines[-1] and "loss 3.0" in lines[-1]
    assert "left, loss" in lines[0]  # the ETA, then the task's status
    assert all(re.search(r", loss \d\.\d{3}$", line) for line in lines)  # whole lines
    assert captured.out == ""  # stdout stays the command's result
    assert "━" not in captured.err  # no bar drawn once more at the end, in a log


def test_notices_and_lines_go_to_the_schedulers_file_too_and_never_fail_a_stage(
    capsys, monkeypatch, tmp_path
):
    """Under a scheduler's task ($PRIVTUNE_NOTICES_FILE) the notices and the plain lines are
    appended there as well; a file the task no longer has is no reason to stop a stage."""
    from privtune.progress import NOTICES_ENV, notice

    path = tmp_path / "notices.txt"
    monkeypatch.setenv(NOTICES_ENV, str(path))
    notice("finetune dpsgd: resuming at step 20")
    with progress_bar(True) as progress:
        task = progress.add_task("attack", total=2, status="")
        for _ in range(2):
            progress.advance(task)
    lines = path.read_text().splitlines()
    assert lines[0] == "finetune dpsgd: resuming at step 20"
    assert [line.split(",")[0] for line in lines[1:]] == ["attack: 1/2 (50%)", "attack: 2/2 (100%)"]
    assert capsys.readouterr().err.startswith("finetune dpsgd: resuming at step 20\n")
    monkeypatch.setenv(NOTICES_ENV, str(tmp_path / "gone" / "notices.txt"))
    notice("still said on stderr")
    assert capsys.readouterr().err == "still said on stderr\n"


def test_no_lines_on_a_terminal_or_when_disabled(capsys):
    shown = io.StringIO()
    terminal = LoggedProgress(console=Console(file=shown, force_terminal=True))
    with terminal:
        task = terminal.add_task("attack", total=4)
        for _ in range(4):
            terminal.advance(task)
    assert "attack: " not in shown.getvalue()  # the live bar, not lines
    with progress_bar(False) as progress:
        task = progress.add_task("attack", total=4, status="")
        for _ in range(4):
            progress.advance(task)
    assert capsys.readouterr().err == ""


def test_a_stage_logs_its_progress_on_stderr_and_its_result_on_stdout(
    tiny_project, tmp_path, monkeypatch
):
    """`privtune finetune` under a worker: the steps as lines, the metrics as JSON, and the
    libraries' bars (carriage-return lines in a log) off."""
    import contextlib

    from privtune.cli import main

    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    root = tmp_path / "p"
    shutil.copytree(tiny_project, root)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["--root", str(root), "finetune", "dpsgd"]) == 0
    result = json.loads(out.getvalue())
    steps = result["steps"]
    lines = [line for line in err.getvalue().splitlines() if line.startswith("finetune dpsgd: ")]
    assert len(lines) == min(10, steps) and lines[-1].startswith(f"finetune dpsgd: {steps}/")
    assert all(re.search(r"loss \d+\.\d{3} eps \d+\.\d{2}$", line) for line in lines)
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
