"""Command line for the pipeline's stages (dvc.yaml calls these).

privtune prepare | base | finetune NAME | evaluate NAME | attack NAME | register [NAME ...]
privtune report | promote [--version V] | rollback | check                [--params params.yaml]

Exit codes: 0 ok, 1 promotion refused by a gate, 2 bad input (parameters, data, model files,
command-line arguments), 3 budget guard, 4 audit violation, 5 unexpected error (a bug: the
traceback is printed), 6 a server does not answer (MLFLOW_TRACKING_URI; a retry may pass),
130 interrupted (Ctrl-C, SIGTERM, a lost torchrun rank). With $PRIVTUNE_ERROR_FILE set, an exit 2-4
also writes {"exit_code", "error", "message"} there as JSON: `dvc repro` runs this command in a
subprocess, and the scheduler (tasks/stages.py) reads the file to fail at once, with the
message, instead of retrying what cannot succeed.

`--root` is the project (where the stage reads and writes its outputs); `--params` defaults to
<root>/params.yaml, and a path given is relative to the current directory, as in any shell.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privtune.errors import (
    AuditViolation,
    BudgetExhausted,
    ConfigError,
    PrivtuneError,
    ServerError,
)
from privtune.io import atomic_file
from privtune.tracking import disable_telemetry, isolated_store

if TYPE_CHECKING:
    from privtune.config import Params

ERROR_FILE_ENV = "PRIVTUNE_ERROR_FILE"
EXIT_OK, EXIT_REFUSED, EXIT_BAD_INPUT, EXIT_BUDGET, EXIT_AUDIT, EXIT_UNEXPECTED = 0, 1, 2, 3, 4, 5
EXIT_UNAVAILABLE = 6  # a server (MLflow tracking) does not answer: a retry may pass
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT
EXIT_BROKEN_PIPE = 141  # the shell's convention for SIGPIPE: the reader closed the pipe

# The params.yaml sections each command reads: one missing from the file is an error.
SECTIONS = {
    "prepare": ("prepare",),
    "base": ("base", "evaluate"),
    "finetune": ("base", "finetune", "methods"),
    "evaluate": ("base", "finetune", "methods", "evaluate"),
    "attack": ("base", "finetune", "methods", "attack"),
    "register": ("methods", "attack", "registry"),
    "report": ("finetune", "methods"),
    "summary": ("methods",),
    "check": ("prepare", "attack", "finetune", "methods"),
    "promote": ("registry",),
    "rollback": ("registry",),
}
# Commands that write stage outputs: leftovers of a killed attempt are removed first.
WRITERS = {"prepare", "base", "finetune", "evaluate", "attack", "register", "report"}


def _common(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command takes, before its name or after it (`privtune finetune
    dpsgd --params p.yaml`); after it they are not repeated defaults (SUPPRESS), so a value
    given before the name stands."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--params",
        default=default(None),
        help="parameter file, relative to the current directory (default: <root>/params.yaml)",
    )
    parser.add_argument("--root", default=default("."), help="project root (stage outputs go here)")
    parser.add_argument(
        "--no-progress", action="store_true", default=default(False), help="hide progress bars"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privtune", description=__doc__.splitlines()[0])
    _common(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _common(common, defaults=False)
    sub = parser.add_subparsers(dest="stage", required=True)

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    add("prepare", help="pseudo-clinical data, splits, canaries, data card")
    add("base", help="tokenizer and base model (pretrained here or loaded)")
    add("report", help="every method side by side: reports/report.md and plots")
    add(
        "check",
        help="what prepare and finetune would refuse, before `dvc repro` removes their "
        "outputs: the corpus, the splits, every method's plan (nothing written)",
    )
    cmd = add("summary", help="print the compact table of every method's results")
    cmd.add_argument("--markdown", action="store_true", help="as a markdown table (README)")
    for stage in ("finetune", "evaluate", "attack"):
        cmd = add(stage, help=f"{stage} one method entry of params.yaml `methods`")
        cmd.add_argument("name", help="a key of `methods` in params.yaml")
    cmd = add("register", help="register the models of `methods` (default: all)")
    cmd.add_argument("names", nargs="*", help="keys of `methods` in params.yaml")
    cmd = add("promote", help="move `champion` to the best new version that passes every gate")
    cmd.add_argument(
        "--version",
        type=_version,
        help="judge this version only, a positive integer (default: every new version)",
    )
    cmd.add_argument("--json", action="store_true", help="print the decisions as JSON")
    back = add("rollback", help="give `champion` back to the previous champion")
    back.add_argument("--json", action="store_true", help="print the rollback as JSON")
    return parser


def _version(value: str) -> str:
    """A registered model version is a positive integer (MLflow's own error would be exit 1,
    which means a gate refusal)."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a version number: use a positive integer, e.g. --version 3 "
            "(the registered model's page in MLflow lists its versions)"
        )
    return str(int(value))


def _params_path(value: str | None, root: Path) -> Path:
    """--params relative to the current directory, as a shell user expects (not to --root);
    without it, the project's own params.yaml."""
    if value is None:
        return root / "params.yaml"
    # abspath: a "../" stays out of the messages that name the file (no symlink is resolved)
    return Path(os.path.abspath(Path(value).expanduser()))


def _promote(params: Params, root: Path, version: str | None, as_json: bool) -> int:
    """One version, or the best eligible of the versions not judged yet: a table of the gates
    (or JSON), exit 0 when a version was promoted, 1 when the gates refused."""
    from privtune.registry import promote, promote_best
    from privtune.registry.promotion import gates_table, nothing_to_promote, version_method

    name, gates = params.registry.name, params.registry.gates
    idle = None if version is not None else nothing_to_promote(name, root=root)
    if idle is not None:  # as the Prefect flow has it: a result (none promoted), not an error
        print(json.dumps({"chosen": None, "why": idle, "decisions": []}) if as_json else idle)
        return EXIT_REFUSED
    if version is not None:
        decision = promote(name, gates, root=root, version=version, params=params)
        result, decisions, why = decision.to_dict(), [decision], decision.reason()
        promoted = decision.promoted
        methods = {decision.version: version_method(name, decision.version, root=root)}
    else:
        selection = promote_best(name, gates, root=root, params=params)
        result, decisions, why = selection.to_dict(), list(selection.decisions), selection.why
        promoted, methods = selection.chosen is not None, selection.methods
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(gates_table(decisions, methods))
        verdict = "promoted" if promoted else "nothing promoted"
        print(f"\n{name}: {verdict}: {why}  (`!` marks a failed gate; --json for details)")
    return EXIT_OK if promoted else EXIT_REFUSED


def built_apart() -> bool:
    """Whether `dvc exp run` builds this stage in a copy of the project (`--temp`, a queued
    run, the sweep's copies: all under .dvc/tmp/), where the outputs DVC removed first are no
    user's; a `dvc exp run` without --temp builds in the workspace, as `dvc repro` does."""
    inside_tmp = "/.dvc/tmp/" in Path.cwd().resolve().as_posix() + "/"
    return "DVC_EXP_BASELINE_REV" in os.environ and inside_tmp


ERROR_FILE_FIELDS = ("exit_code", "error", "message")  # what read_error_file reads back


def _fail(code: int, label: str, err: Exception) -> int:
    """Print the error; leave it for the scheduler too when it asked (exit codes 2-4 are
    deterministic: a retry would fail the same way, or worse, retry an audit until it passes;
    under torchrun every rank finds the same one, and rank 0 alone says it)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return code
    print(f"{label}: {err}", file=sys.stderr)
    stage = os.environ.get("DVC_STAGE")  # set by `dvc repro` for the stage's command
    if stage and not built_apart():
        checked = code == EXIT_BAD_INPUT and stage.partition("@")[0] in ("prepare", "finetune")
        if "DVC_EXP_BASELINE_REV" in os.environ:  # `dvc exp run` in the workspace
            what = (
                f"`dvc exp run` removed {stage}'s previous outputs from the workspace before "
                "running it, and left any -S values in params.yaml: once params.yaml is fixed "
                "or back as it was (`git checkout params.yaml`)"
            )
            check = "set the values in params.yaml and `privtune check` them before `dvc exp run`"
        else:
            what = (
                f"`dvc repro` removed {stage}'s previous outputs before running it: once the "
                "input is fixed"
            )
            check = "`privtune check` finds such errors before `dvc repro`"
        print(
            f"({what}, `dvc repro` brings them back, from DVC's run cache in seconds when it "
            "is as it was then" + (f"; {check})" if checked else ")"),
            file=sys.stderr,
        )
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        report = {k: v for k, v in _error_report(code, err).items() if k in ERROR_FILE_FIELDS}
        with atomic_file(path) as handle:  # a reader never sees half a report
            json.dump(report, handle)
    return code


def read_error_file(path: str | Path) -> dict[str, Any] | None:
    """What a failed command left at $PRIVTUNE_ERROR_FILE (``exit_code``, ``error``,
    ``message``: fields, never records); None when it left nothing readable."""
    try:
        report = json.loads(Path(path).read_text())
        fields = {"exit_code": int(report["exit_code"]), "error": str(report["error"])}
        return fields | {"message": str(report["message"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    # under torchrun every rank parses the same arguments: rank 0 alone says what is wrong
    quiet = int(os.environ.get("RANK", "0")) != 0
    said = StringIO()
    try:
        with contextlib.redirect_stderr(said):
            args = _parser().parse_args(argv)
    except SystemExit as done:  # argparse printed the usage and the error (exit 2), or --help
        code = int(done.code or 0)
        if not quiet:
            sys.stderr.write(said.getvalue())
            if code and "--json" in (sys.argv[1:] if argv is None else argv):  # for a tool
                message = said.getvalue().strip().splitlines()[-1].partition(": error: ")[2]
                print(json.dumps({"exit_code": code, "error": "UsageError", "message": message}))
        return code
    disable_telemetry()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    failed: list[BaseException] = []
    # MLflow's tracking URI as it was after the command: main() may run again in this process
    with isolated_store(), _terminate_as_interrupt():
        code = _guarded(args, failed)
    if failed and getattr(args, "json", False) and code != EXIT_BROKEN_PIPE:
        # a tool that asked for JSON reads the failure as JSON too (stderr has it in words)
        print(json.dumps(_error_report(code, failed[0])))
    return code


def _error_report(code: int, err: BaseException) -> dict[str, Any]:
    """A failure for a program: exit code, error class, message (fields, never records), and
    a privtune error's field, problem and fix."""
    report: dict[str, Any] = {"exit_code": code, "error": type(err).__name__}
    # an unexpected error's text is a library's (it may quote anything): the traceback on
    # stderr is for the report, the JSON says only what happened
    words = {EXIT_INTERRUPTED: "interrupted: rerun the same command", EXIT_UNEXPECTED: "a bug"}
    report["message"] = words.get(code, str(err))
    if isinstance(err, PrivtuneError):
        report |= {"field": err.field, "problem": err.problem, "fix": err.fix}
    return report


def _guarded(args: argparse.Namespace, failed: list[BaseException]) -> int:
    """The command, its failures turned into the documented exit codes (each noted in
    ``failed``)."""
    try:
        return _run_noting(args, failed)
    except ServerError as err:  # not written to $PRIVTUNE_ERROR_FILE: the task retries
        print(f"unavailable: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except PrivtuneError as err:
        return _fail(EXIT_BAD_INPUT, "error", err)
    except BudgetExhausted as err:
        return _fail(EXIT_BUDGET, "privacy budget violation", err)
    except AuditViolation as err:
        return _fail(EXIT_AUDIT, "privacy audit violation", err)
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        return _interrupted("terminated (SIGTERM)" if terminated else "interrupted")
    except BrokenPipeError:  # the reader stopped (`| head`): what was done stays done
        # Python's recipe: stdout to devnull, or its flush at exit raises again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as err:  # a bug, not the input: the traceback is what to report
        if TERMINATED.is_set():  # SIGTERM landed in an import, which failed of it
            return _interrupted("terminated (SIGTERM)")
        if _lost_a_rank(err):
            print(
                f"interrupted: another process of this distributed run stopped "
                f"({type(err).__name__}: its connection closed; the MLflow run is FAILED); "
                "rerun the same torchrun command to resume",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        traceback.print_exc()
        print(
            f"unexpected error ({type(err).__name__}): this is a bug in privtune or its "
            "environment; report it with the traceback above",
            file=sys.stderr,
        )
        return EXIT_UNEXPECTED


def _interrupted(how: str) -> int:
    print(f"{how}: rerun the same command to resume or redo it", file=sys.stderr)
    return EXIT_INTERRUPTED


def _run_noting(args: argparse.Namespace, failed: list[BaseException]) -> int:
    try:
        return _run(args)
    except BaseException as err:
        failed.append(err)
        raise


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's cancel, `kill`, torchrun passing on its own): stopped as Ctrl-C
    stops a command, its MLflow run KILLED and saying why, not left RUNNING."""


# Set when SIGTERM raised Terminated: an import it landed in can turn it into another error
# (a module half-initialised: matplotlib's, a dataclass's), which is still the interruption.
TERMINATED = threading.Event()


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises Terminated while a command runs (in the main thread only: a signal
    handler cannot be set elsewhere, e.g. a Prefect task's thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, restore)  # a second one, while stopping, ends it at once
        TERMINATED.set()
        raise Terminated

    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:  # the caller asked for SIGTERM to be ignored: it stays so
        yield
        return
    restore = signal.SIG_DFL if previous is None else previous  # None: a handler set in C
    TERMINATED.clear()
    signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, restore)


def _lost_a_rank(err: Exception) -> bool:
    """Whether a rank of a torchrun run failed because another rank went away (its connection
    closed or was reset): an interruption of the run, not a bug of this process. Any other
    collective error (mismatched collectives: a bug) keeps its traceback."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not isinstance(err, RuntimeError):
        return False
    text = str(err)
    return "closed by peer" in text or "reset by peer" in text


def quiet_library_progress() -> None:
    """--no-progress, or no terminal to draw on, hides the libraries' bars too (transformers'
    "Loading weights", MLflow's "Downloading artifacts"), not only ours: in a log they are
    lines joined by carriage returns, and a scheduled run's log stays readable."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when transformers is imported
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    if "transformers" in sys.modules:  # already imported: switch its flag off
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _run(args: argparse.Namespace) -> int:
    """Load the stage's parameters, clean a killed attempt's leftovers, run the command."""
    from privtune.config import load_params

    root = Path(args.root)
    if not root.is_dir():
        raise ConfigError(
            "--root", f"'{root}' is not a directory", "pass the project's directory, or omit it"
        )
    progress = not args.no_progress
    if not progress or not sys.stderr.isatty():  # ours then print lines (privtune.progress)
        quiet_library_progress()
    params = load_params(_params_path(args.params, root), SECTIONS[args.stage])
    if args.stage in ("promote", "rollback"):  # before the registry lock's file, or a store
        from privtune.tracking import require_store

        require_store(root)
    if args.stage in WRITERS:
        from privtune.progress import notice
        from privtune.stages.common import remove_stale_outputs

        for path in remove_stale_outputs(root):
            notice(f"removed {path}: left by an interrupted run")
    if args.stage == "prepare":
        from privtune.stages.prepare import prepare

        result = prepare(params, root)
    elif args.stage == "base":
        from privtune.stages.base import base

        result = base(params, root, show_progress=progress)
    elif args.stage == "finetune":
        from privtune.stages.finetune import finetune

        result = finetune(params, args.name, root, show_progress=progress)
    elif args.stage == "evaluate":
        from privtune.stages.evaluate import evaluate

        result = evaluate(params, args.name, root)
    elif args.stage == "attack":
        from privtune.stages.attack import attack

        result = attack(params, args.name, root, show_progress=progress)
    elif args.stage == "register":
        from privtune.stages.register import register

        result = register(params, args.names, root)
    elif args.stage == "report":
        from privtune.stages.report import report

        result = report(params, root)
    elif args.stage == "check":
        from privtune.stages.preflight import check_all

        print("\n".join(check_all(params, root)))
        return EXIT_OK
    elif args.stage == "summary":
        from privtune.stages.report import summary_table

        print(summary_table(params, root, markdown=args.markdown))
        return EXIT_OK
    elif args.stage == "promote":
        return _promote(params, root, args.version, args.json)
    else:
        from dataclasses import asdict

        from privtune.registry import rollback

        done = rollback(params.registry.name, root=root, gates=params.registry.gates)
        if int(os.environ.get("RANK", "0")) == 0:
            if args.json:
                print(json.dumps(asdict(done), indent=2))
            else:
                print(
                    f"{done.name}: champion v{done.from_version} -> v{done.to_version} (rolled "
                    f"back: v{done.from_version}'s page says so; its gate decision is kept)"
                )
                if done.warning:
                    print(f"warning: {done.warning}")
        return EXIT_OK
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone reports
        print(json.dumps(result, indent=2, default=str))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
