"""What a stage's command would refuse, checked before DVC runs the stage.

DVC removes a stage's outputs before it starts the stage's command, so an error the command
then finds (an epsilon no noise can certify, a corpus path that does not exist) would leave
the last good outputs gone, and under Prefect the error would arrive as DVC's bare "failed to
reproduce". The scheduler's tasks (tasks/stages.py) and the lanes (privtune/lanes.py) call
`check` first. It needs no model: the corpus' path, and the fine-tuning plan (N, q, steps,
delta, calibrated noise; the calibration is cached on disk, so the stage does not pay twice).
"""

from __future__ import annotations

from pathlib import Path

from privtune.config import PREPARED_DIR, load_params


def check(root: str | Path, target: str) -> None:
    """Raise the stage's own error (a PrivtuneError naming the field and the fix) for what
    it would refuse; ``target`` is a DVC stage name (``prepare``, ``finetune@dpsgd``).
    Stages other than prepare and finetune, and a finetune whose data is not prepared yet
    (DVC then says so), are left to the stage itself."""
    root = Path(root)
    stage, _, name = target.partition("@")
    if stage == "prepare":
        from privtune.stages.prepare import source_path

        source_path(load_params(root / "params.yaml"), root)
    elif stage == "finetune" and (root / PREPARED_DIR / "train.jsonl").is_file():
        from privtune.stages.finetune import finetune_plan

        finetune_plan(load_params(root / "params.yaml"), name, root)
