"""Promotion and rollback of the registered model as Prefect flows (deployed on the CPU pool).

python flows/promote.py            # promote the challenger if every gate holds
python flows/promote.py rollback   # give `champion` back to the previous champion

The gates and the registered model's name come from params.yaml (`registry:`), as for
`privtune promote`; a refusal is a decision, not a failure: the flow completes and returns it.
So is "nothing to promote" (no challenger, or, for the pipeline's promotion, no version not
judged yet): a nightly run with no new model has nothing to do.
Only transient failures are retried; a configuration or model error fails at once.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from tasks.stages import transient  # noqa: E402

# What MLflow answers for a missing registered model, or a missing alias.
_NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


def one_at_a_time() -> contextlib.AbstractContextManager[None]:
    """Hold the one slot of Prefect's global concurrency limit `privtune-registry` that every
    promotion and rollback holds (privtune/registry/lock.py): the lock for stores behind a
    tracking server, where privtune has none of its own beside the store; the promotion the
    flow then calls sees it held and does not wait for itself."""
    from privtune.registry.lock import prefect_slot

    return prefect_slot()


def _registry(root: str):
    from privtune.config import load_params

    return load_params(Path(root) / "params.yaml").registry


@task(
    name="challenger",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,
)
def challenger(root: str) -> str | None:
    """The challenger's version (None: there is none), resolved once before `decide`: a
    promotion consumes the challenger alias, so a `decide` retried after it (a transient error
    while the registry was being described) must be given the version, not look it up again."""
    from mlflow.exceptions import MlflowException

    from privtune.registry import CHALLENGER
    from privtune.registry.promotion import stopped_promotion
    from privtune.registry.register import client

    try:
        found = client(root).get_model_version_by_alias(_registry(root).name, CHALLENGER)
    except MlflowException as err:
        if err.error_code not in _NOT_FOUND:  # e.g. the tracking server is down: retry
            raise
        # a promotion stopped after it took the alias: `decide` finishes it, not skipped
        return stopped_promotion(_registry(root).name, root=root)
    return str(found.version)


def _report(name: str, decisions: list, methods: dict | None, promoted: bool, why: str) -> None:
    """The outcome where a scheduled run's reader looks: the gate table and the verdict in the
    flow's log (what `privtune promote` prints), and as the run's `promotion` artifact."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    from privtune.registry.promotion import gates_table

    table = gates_table(decisions, methods)
    verdict = f"{name}: {'promoted' if promoted else 'nothing promoted'}: {why}"
    reasons = "\n".join(decision.summary() for decision in decisions)
    get_run_logger().info("%s\n%s\n(`!` marks a failed gate)\n%s", verdict, table, reasons)
    if FlowRunContext.get() or TaskRunContext.get():  # an artifact belongs to a run
        create_markdown_artifact(
            markdown=f"**{verdict}**\n\n```text\n{table}\n```\n\n`!` marks a failed gate."
            f"\n\n```text\n{reasons}\n```",
            key="promotion",
            description=f"the gates of {name}'s candidates and the verdict",
        )


def _retried() -> bool:
    """Whether this task run is a retry (Prefect counts its attempts from 1)."""
    from prefect.runtime import task_run

    return task_run.run_count > 1


def _nothing_to_promote(name: str) -> dict:
    return {"name": name, "version": None, "promoted": False, "nothing_to_promote": True}


@task(
    name="decide",
    task_run_name="decide-v{version}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,
)
def decide(root: str, version: str | None) -> dict:
    """Judge one version (None: the challenger, looked up now) against the gates; idempotent
    under retries for a given version (the flow passes the challenger's, see `challenger`).

    Without a challenger there is nothing to promote: that is the result, not a failure.
    """
    from privtune.errors import ModelError
    from privtune.registry import CHALLENGER, CHAMPION, promote
    from privtune.registry.promotion import alias_version, stopped_promotion
    from privtune.registry.register import client

    registry = _registry(root)
    if version is None:
        version = challenger.fn(root)
        if version is None:
            get_run_logger().info("nothing to promote: %s has no %s", registry.name, CHALLENGER)
            return _nothing_to_promote(registry.name)

    def champion_now() -> bool:
        champion = alias_version(client(root), registry.name, CHAMPION)
        return champion is not None and str(champion.version) == str(version)

    done = {"name": registry.name, "version": str(version), "promoted": True}
    # A retry after the alias moved must not fail as "already the champion" (promote finishes
    # a promotion stopped before the registry showed it).
    if champion_now() and stopped_promotion(registry.name, root=root) != str(version):
        return done
    try:
        decision = promote(registry.name, registry.gates, root=root, version=version)
    except ModelError:
        if champion_now():  # a reviewer's promotion of it finished while this one waited
            return done
        raise
    _report(registry.name, [decision], None, decision.promoted, decision.reason())
    return decision.to_dict()


@task(
    name="choose",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,
)
def choose(root: str) -> list[dict]:
    """The best eligible of the versions not judged yet becomes champion (`privtune promote`).
    Nothing new: nothing to promote, a result; a challenger judged already is not judged
    again on every scheduled run (`privtune promote` or `--version N` judges it again). A
    retry of this task judges the challenger again: the failed attempt may have recorded
    its decisions before failing, and the retry's result rebuilds them."""
    from privtune.registry import CHALLENGER, pending_versions, promote_best
    from privtune.registry.promotion import alias_version, stopped_promotion
    from privtune.registry.register import client

    registry = _registry(root)
    # a promotion stopped before the registry showed it is finished by promote_best
    waiting = pending_versions(registry.name, root=root)
    waiting = waiting or [v for v in [stopped_promotion(registry.name, root=root)] if v]
    # every version judged (the challenger too: refused, it keeps the alias)
    challenger = None if waiting else alias_version(client(root), registry.name, CHALLENGER)
    if not waiting and (challenger is None or not _retried()):
        why = "" if challenger is None else f" (challenger v{challenger.version} judged already)"
        get_run_logger().info("nothing to promote: no new version of %s%s", registry.name, why)
        return [_nothing_to_promote(registry.name)]
    selection = promote_best(registry.name, registry.gates, root=root)
    promoted = selection.chosen is not None
    _report(registry.name, list(selection.decisions), selection.methods, promoted, selection.why)
    return [decision.to_dict() for decision in selection.decisions]


@task(
    name="compare-with-champion",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,
)
def measure(root: str, version: str | None, pending: bool) -> None:
    """Candidates compared with the champion on the same records (privtune/registry/paired.py)
    before the registry's slot is taken: their registered per-record scores, or, on other test
    data, both measured again (minutes on a large model, which a reviewer's promotion need not
    wait for)."""
    from privtune.registry.promotion import pair_candidates

    registry = _registry(root)
    found = pair_candidates(registry.name, registry.gates, root=root, version=version, best=pending)
    for candidate, paired in found.items():
        if paired.error:
            get_run_logger().warning("v%s: not compared: %s", candidate, paired.error)
            continue
        interval = (
            f", {paired.confidence:.0%} interval of the difference [{paired.low:+.4g}, "
            f"{paired.high:+.4g}]"
            if paired.low is not None and paired.high is not None and paired.confidence
            else ""
        )
        get_run_logger().info(
            "v%s: %s %.6g vs champion v%s %.6g on %d test records (%d it saw left out; %s)%s",
            candidate, paired.metric, paired.value, paired.champion, paired.champion_value,
            paired.records, paired.excluded,
            "measured side by side" if paired.measured else "registered scores", interval,
        )  # fmt: skip


@flow(name="privtune-promote", log_prints=True)
def promote(root: str = ".", version: str | None = None, pending: bool = False) -> list[dict]:
    """Move `champion` through the gates: to `version`, or to the best eligible of the
    versions not judged yet (``pending``, as the nightly pipeline does), or to the challenger."""
    from privtune.config import project_root
    from privtune.tracking import disable_telemetry

    disable_telemetry()
    root = str(project_root(root))
    measure(root, version, pending)
    with one_at_a_time():
        if version is not None:
            return [decide(root, version)]
        if pending:
            return choose(root)
        # pinned here, not in `decide`: its retries then judge the same version (challenger)
        version = challenger(root)
        if version is None:
            get_run_logger().info("nothing to promote: no challenger")
            return [_nothing_to_promote(_registry(root).name)]
        return [decide(root, version)]


@flow(name="privtune-rollback", log_prints=True)
def rollback(root: str = ".") -> dict:
    """Give `champion` back to the version that held it before the last promotion."""
    from dataclasses import asdict

    from privtune.config import project_root
    from privtune.registry import rollback as rollback_champion
    from privtune.tracking import disable_telemetry

    disable_telemetry()
    root = str(project_root(root))
    with one_at_a_time():
        registry = _registry(root)
        done = rollback_champion(registry.name, root=root, gates=registry.gates)
    get_run_logger().info("champion: v%s -> v%s", done.from_version, done.to_version)
    if done.warning:  # a seeded or since-refused champion is back: say so where it is read
        get_run_logger().warning("%s", done.warning)
    return asdict(done)


def main(argv: list[str] | None = None) -> None:
    """`python flows/promote.py [--version V | --pending]` or `python flows/promote.py
    rollback`: the flows, run here."""
    from privtune.tracking import disable_telemetry

    # before the flow starts Prefect's temporary server, which inherits this environment
    disable_telemetry()
    import argparse

    parser = argparse.ArgumentParser(description="Move `champion` through the gates, or back.")
    parser.add_argument("action", nargs="?", choices=["promote", "rollback"], default="promote")
    parser.add_argument("--version", help="judge this version only")
    parser.add_argument("--pending", action="store_true", help="every version not judged yet")
    args = parser.parse_args(argv)
    if args.action == "rollback":
        rollback()
    else:
        promote(version=args.version, pending=args.pending)


if __name__ == "__main__":
    main()
