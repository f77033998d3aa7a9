"""Command line for the pipeline's stages (dvc.yaml calls these).

privtune prepare | base | finetune NAME | evaluate NAME   [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from privtune.errors import BudgetExhausted, PrivtuneError
from privtune.tracking import disable_telemetry


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privtune", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameter file")
    parser.add_argument("--root", default=".", help="project root (stage outputs go here)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="stage", required=True)
    sub.add_parser("prepare", help="pseudo-clinical data, splits, canaries, data card")
    sub.add_parser("base", help="tokenizer and base model (pretrained here or loaded)")
    for stage in ("finetune", "evaluate"):
        cmd = sub.add_parser(stage, help=f"{stage} one method entry of params.yaml `methods`")
        cmd.add_argument("name", help="a key of `methods` in params.yaml")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    disable_telemetry()
    warnings.filterwarnings("ignore", module="opacus")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from privtune import stages
    from privtune.config import load_params

    root = Path(args.root)
    progress = not args.no_progress
    try:
        params = load_params(
            Path(args.params) if Path(args.params).is_absolute() else root / args.params
        )
        if args.stage == "prepare":
            result = stages.prepare(params, root)
        elif args.stage == "base":
            result = stages.base(params, root, show_progress=progress)
        elif args.stage == "finetune":
            result = stages.finetune(params, args.name, root, show_progress=progress)
        else:
            result = stages.evaluate(params, args.name, root)
    except PrivtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BudgetExhausted as err:
        print(f"privacy budget violation: {err}", file=sys.stderr)
        return 3
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
