"""The Prefect pull step every deployment in prefect.yaml runs on the worker, at run time.

A deployment must not carry the deployer's paths: `prefect deploy` resolves `{{ $VAR }}`
templates on the deployer's machine, so a `set_working_directory` to `{{ $PRIVTUNE_ROOT }}`
would send every worker into the deployer's checkout. This step runs on the worker instead.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT_ENV = "PRIVTUNE_ROOT"
TRACKING_ENV = "MLFLOW_TRACKING_URI"


def project_root(environ: dict[str, str] | None = None) -> Path:
    """The checkout a worker runs in: $PRIVTUNE_ROOT on the worker, else the project that the
    worker's `privtune` was installed from (`pip install -e .`). Raises if neither is one."""
    environ = os.environ if environ is None else environ
    if environ.get(ROOT_ENV):
        root = Path(environ[ROOT_ENV]).expanduser().resolve()
        where = f"${ROOT_ENV}={environ[ROOT_ENV]} on this worker"
    else:
        import privtune

        root = Path(privtune.__file__).resolve().parents[2]
        where = f"{root} (the checkout privtune is installed from; ${ROOT_ENV} is not set)"
    if not (root / "dvc.yaml").is_file():
        raise FileNotFoundError(
            f"no privtune project at {where}: start the worker with "
            f"`{ROOT_ENV}=/path/to/your/checkout prefect worker start --pool <pool>`"
        )
    return root


def absolute_tracking_uri(uri: str, root: Path) -> str:
    """A relative sqlite URI (the deployments' default `sqlite:///mlflow.db`) names the file in
    the project root, whatever directory a stage's command runs in."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri.removeprefix(prefix)).is_absolute():
        return f"{prefix}{root / uri.removeprefix(prefix)}"
    return uri


def set_project_root() -> dict[str, str]:
    """Prefect pull step: chdir into this worker's checkout and pin the tracking URI to it."""
    root = project_root()
    os.chdir(root)
    if os.environ.get(TRACKING_ENV):
        os.environ[TRACKING_ENV] = absolute_tracking_uri(os.environ[TRACKING_ENV], root)
    return {"directory": str(root)}  # not the URI: it may hold a server's credentials
