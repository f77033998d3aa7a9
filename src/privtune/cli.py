"""Command line for the pipeline's stages (dvc.yaml calls these).

privtune prepare | base | finetune NAME | evaluate NAME | attack NAME | register [NAME ...]
privtune report | promote [--version V] | rollback                        [--params params.yaml]

Exit codes: 0 ok, 1 promotion refused by a gate, 2 bad input, 3 budget guard, 4 audit violation.
With $PRIVTUNE_ERROR_FILE set, an exit 2-4 also writes {"exit_code", "error", "message"} there
as JSON: `dvc repro` runs this command in a subprocess, and the scheduler (tasks/stages.py) reads
the file to fail at once, with the message, instead of retrying what cannot succeed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from privtune.errors import AuditViolation, BudgetExhausted, PrivtuneError
from privtune.tracking import disable_telemetry

if TYPE_CHECKING:
    from privtune.config import Params

ERROR_FILE_ENV = "PRIVTUNE_ERROR_FILE"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privtune", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameter file")
    parser.add_argument("--root", default=".", help="project root (stage outputs go here)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="stage", required=True)
    sub.add_parser("prepare", help="pseudo-clinical data, splits, canaries, data card")
    sub.add_parser("base", help="tokenizer and base model (pretrained here or loaded)")
    sub.add_parser("report", help="every method side by side: reports/report.md and plots")
    cmd = sub.add_parser("summary", help="print the compact table of every method's results")
    cmd.add_argument("--markdown", action="store_true", help="as a markdown table (README)")
    for stage in ("finetune", "evaluate", "attack"):
        cmd = sub.add_parser(stage, help=f"{stage} one method entry of params.yaml `methods`")
        cmd.add_argument("name", help="a key of `methods` in params.yaml")
    cmd = sub.add_parser("register", help="register the models of `methods` (default: all)")
    cmd.add_argument("names", nargs="*", help="keys of `methods` in params.yaml")
    cmd = sub.add_parser(
        "promote", help="move `champion` to the best new version that passes every gate"
    )
    cmd.add_argument("--version", help="judge this version only (default: every new version)")
    cmd.add_argument("--json", action="store_true", help="print the decisions as JSON")
    sub.add_parser("rollback", help="give `champion` back to the previous champion")
    return parser


def _promote(params: Params, root: Path, version: str | None, as_json: bool) -> int:
    """One version, or the best eligible of the versions not judged yet: a table of the gates
    (or JSON), exit 0 when a version was promoted, 1 when the gates refused."""
    from privtune.registry import promote, promote_best
    from privtune.registry.promotion import gates_table

    name, gates = params.registry.name, params.registry.gates
    if version is not None:
        decision = promote(name, gates, root=root, version=version)
        result, decisions, why = decision.to_dict(), [decision], decision.reason()
        promoted, methods = decision.promoted, None
    else:
        selection = promote_best(name, gates, root=root)
        result, decisions, why = selection.to_dict(), list(selection.decisions), selection.why
        promoted, methods = selection.chosen is not None, selection.methods
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(gates_table(decisions, methods))
        verdict = "promoted" if promoted else "nothing promoted"
        print(f"\n{name}: {verdict}: {why}  (`!` marks a failed gate; --json for details)")
    return 0 if promoted else 1


def _fail(code: int, label: str, err: Exception) -> int:
    """Print the error; leave it for the scheduler too when it asked (exit codes 2-4 are
    deterministic: a retry would fail the same way, or worse, retry an audit until it passes)."""
    print(f"{label}: {err}", file=sys.stderr)
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        report = {"exit_code": code, "error": type(err).__name__, "message": str(err)}
        Path(path).write_text(json.dumps(report))
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    disable_telemetry()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from privtune.config import load_params

    root = Path(args.root)
    progress = not args.no_progress
    code = 0
    try:
        params = load_params(
            Path(args.params) if Path(args.params).is_absolute() else root / args.params
        )
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
        elif args.stage == "summary":
            from privtune.stages.report import summary_table

            print(summary_table(params, root, markdown=args.markdown))
            return 0
        elif args.stage == "promote":
            return _promote(params, root, args.version, args.json)
        else:
            from dataclasses import asdict

            from privtune.registry import rollback

            result = asdict(rollback(params.registry.name, root=root))
    except PrivtuneError as err:
        return _fail(2, "error", err)
    except BudgetExhausted as err:
        return _fail(3, "privacy budget violation", err)
    except AuditViolation as err:
        return _fail(4, "privacy audit violation", err)
    print(json.dumps(result, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
