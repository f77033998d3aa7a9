"""The pipeline's stages, one module each (stage = module = params section).

dvc.yaml calls them through the CLI, and the Prefect tasks run the same DVC stages, so each
stage has exactly one definition. Every stage validates its inputs first, then writes its
outputs atomically. Import a stage from its own module (``privtune.stages.finetune``): this
package imports none of them, so a stage's import closure (its code dependencies in dvc.yaml,
checked by tests/test_dvc_deps.py) holds only what it runs.
"""
