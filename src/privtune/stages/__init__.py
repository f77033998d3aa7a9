"""The pipeline's stages, one module each (stage = module = params section).

dvc.yaml calls them through the CLI, and the Prefect tasks run the same DVC stages, so each
stage has exactly one definition. Every stage validates its inputs first, then writes its
outputs atomically.
"""

from privtune.stages.attack import attack
from privtune.stages.base import base
from privtune.stages.evaluate import evaluate
from privtune.stages.finetune import finetune
from privtune.stages.prepare import prepare
from privtune.stages.register import register
from privtune.stages.report import report

__all__ = ["attack", "base", "evaluate", "finetune", "prepare", "register", "report"]
