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
from tasks import lockfile, stages  # noqa: E402


@flow(name="privtune-finetune", log_prints=True)
def finetune(
    method: str,
    root: str = ".",
    force: bool = False,
    share: bool = False,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    lock: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    """`dvc repro finetune@<method>` on this worker (CUDA when it has a GPU: device auto).

    With ``share``, the data and base model come from the DVC remote as named by ``lock`` (the
    dispatcher's dvc.lock entries of `prepare` and `base`), and the outputs go back there, their
    dvc.lock entry and metrics published on this flow run for the dispatcher
    (tasks/lockfile.py). With ``profile`` / ``overrides`` (a quick run of the pipeline), in
    that profile's own project (privtune/profiles.py), the one the pipeline built in the same
    checkout.
    """
    from privtune.config import project_root
    from privtune.tracking import disable_telemetry

    disable_telemetry()
    root = str(project_root(root))
    if profile or overrides:
        # the pipeline checked the whole project; the stage checks its own plan
        root = str(profiles.project(root, profile, overrides, check=False))
    target = f"finetune@{method}"
    if share:  # the data and base model were built on another machine
        if lock:
            lockfile.adopt(root, lock)
        stages.pull("prepare", root)
        stages.pull("base", root)
    ran = stages.finetune(method, root, force)
    if share:
        stages.push(target, root)
        lockfile.publish(root, target)
    return ran


def main(argv: list[str] | None = None) -> None:
    """`python flows/finetune.py [METHOD] [--force]`: one fine-tuning, run here."""
    from privtune.tracking import disable_telemetry

    # before the flow starts Prefect's temporary server, which inherits this environment
    disable_telemetry()
    import argparse

    parser = argparse.ArgumentParser(description="`dvc repro finetune@<method>` as a flow.")
    parser.add_argument("method", nargs="?", default="dpsgd", help="a key of params.yaml methods")
    parser.add_argument("--force", action="store_true", help="rerun even if up to date")
    args = parser.parse_args(argv)
    finetune(args.method, force=args.force)


if __name__ == "__main__":
    main()
