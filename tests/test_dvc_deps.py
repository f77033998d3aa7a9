"""dvc.yaml's code dependencies cover what each stage runs: its import closure.

Without this, `dvc repro` could say "up to date" after a change to a module a stage imports but
does not list. The closure is computed statically from the source: every privtune import
(module-level and inside functions) from the stage's module, plus the CLI that runs it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
STAGES = ["prepare", "base", "finetune", "evaluate", "attack", "register", "report"]


def _file(module: str) -> Path | None:
    path = SRC.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("privtune")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("privtune"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in found if _file(m)}


def import_closure(stage: str) -> set[Path]:
    """Source files a `privtune <stage>` run can execute (parent packages included)."""
    # The CLI dispatches to the stage; its other branches' lazy imports are not this stage's.
    todo = [f"privtune.stages.{stage}", "privtune.cli", *_imports(_file("privtune.cli"), True)]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        if module != "privtune.cli":
            todo += _imports(_file(module))
    return {_file(m).relative_to(ROOT) for m in seen}


def _stage_deps(stage: str) -> list[Path]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    deps = spec.get("do", spec)["deps"]
    return [Path(d) for d in deps if d.startswith("src/")]


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_depends_on_every_module_it_imports(stage):
    deps = _stage_deps(stage)
    missing = sorted(
        str(f) for f in import_closure(stage) if not any(f == d or d in f.parents for d in deps)
    )
    assert not missing, f"dvc.yaml stage `{stage}` misses code deps: {missing}"


def test_the_closure_follows_lazy_imports():
    """The finetune stage imports the loop inside its function: the closure must see it."""
    closure = import_closure("finetune")
    assert Path("src/privtune/train.py") in closure
    assert Path("src/privtune/privacy/mechanisms/gaussian.py") in closure
    assert Path("src/privtune/attacks/run.py") not in closure
