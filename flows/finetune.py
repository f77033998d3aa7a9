"""Fine-tuning of one method as its own flow, so it can be deployed to a GPU work pool.

The pipeline flow calls it through `run_deployment` when given `finetune_deployment`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow  # noqa: E402

from privtune import profiles  # noqa: E402
from tasks import stages  # noqa: E402


@flow(name="privtune-finetune", log_prints=True)
def finetune(
    method: str,
    root: str = ".",
    force: bool = False,
    share: bool = False,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[str]:
    """`dvc repro finetune@<method>` on this worker (CUDA when it has a GPU: device auto).

    With ``share``, the outputs go to the DVC remote for workers on other machines. With
    ``profile`` / ``overrides`` (a quick run of the pipeline), in that profile's own project
    (privtune/profiles.py), the one the pipeline built in the same checkout.
    """
    from privtune.tracking import disable_telemetry

    disable_telemetry()
    root = str(Path(root).resolve())
    if profile or overrides:
        root = str(profiles.project(root, profile, overrides))
    if share:  # the data and base model were built on another machine
        stages.pull("prepare", root)
        stages.pull("base", root)
    ran = stages.finetune(method, root, force)
    if share:
        stages.push(f"finetune@{method}", root)
    return ran


if __name__ == "__main__":
    finetune(sys.argv[1] if len(sys.argv) > 1 else "dpsgd")
