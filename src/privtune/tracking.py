"""The one place that talks to MLflow.

Where runs and models go, in this order: $MLFLOW_TRACKING_URI when set (a team's tracking
server, http://host:5000, whose artifacts it serves itself: privtune.team), else the project's
own sqlite store <project>/mlflow.db with artifacts in <project>/mlruns (the embedded default;
MLflow 3 refuses the plain file store). Only configuration, numbers and files we choose are
logged: never record text.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXPERIMENT = "privtune"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def disable_telemetry() -> None:
    """There is no internet here (nor, often, in a hospital): no tool may phone home."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def tracking_uri(root: str | Path = ".") -> str:
    """$MLFLOW_TRACKING_URI (a team's server, or any store MLflow takes), else the project's
    sqlite file: an environment setting, not a parameter, because the store is the machine's
    deployment, not part of what an experiment is (DVC never hashes it)."""
    return os.environ.get(TRACKING_ENV) or f"sqlite:///{Path(root).resolve()}/mlflow.db"


def require_store(root: str | Path = ".") -> None:
    """For the commands that judge what is registered (promote, rollback): a sqlite store that
    does not exist holds nothing, and opening it would create it (its directory too) before
    saying so. Bad input, exit 2, nothing written."""
    uri = tracking_uri(root)
    path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if not uri.startswith("sqlite:///") or (path.is_file() and path.stat().st_size > 0):
        return  # (an empty file holds nothing either: opening it would migrate it)
    from privtune.errors import ModelError

    setting = TRACKING_ENV if os.environ.get(TRACKING_ENV) else "--root"
    where = f"{TRACKING_ENV} at the store" if setting == TRACKING_ENV else "--root at the project"
    raise ModelError(
        setting,
        f"no MLflow store at {path}: nothing is registered there",
        "run the pipeline first (`dvc repro`: its register stage registers the models), or "
        f"point {where} that holds them",
    )


def check_server(uri: str, timeout: float = 5.0) -> None:
    """An http(s) store must answer now. MLflow's client retries each failed call for minutes
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES) before it says anything; this fails at once, naming the
    setting. Any answer below 500 counts (a proxy's 401 or 404 is a server that is up)."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        if err.code < 500:
            return
        problem = f"answers HTTP {err.code}"
    except (OSError, ValueError) as err:
        problem = f"does not answer ({getattr(err, 'reason', err)})"
    from privtune.errors import ServerError

    raise ServerError(
        TRACKING_ENV,
        f"the MLflow tracking server {uri} {problem}",
        "start it (`make team-servers`, README: Team deployment) or check the URL; unset "
        f"{TRACKING_ENV} to use the project's own sqlite store",
    )


# MLflow's SQLAlchemy stores on a database server (sqlite is a file, checked by opening it)
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
_REACHED: set[str] = set()  # the database stores this process has connected to


def redact(url: str) -> str:
    """A database URL without its password: for messages and logs."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


# What a database server says when it answered and refused the login or the database name
# (PostgreSQL's and MySQL's own words): a retry will not change that, so it is a setting to
# fix (exit 2), not a server that is down (exit 6, retried). Matched on text because psycopg2
# gives a refused connection no SQLSTATE; a server speaking another language falls back to 6.
_REFUSALS = (
    "authentication failed",  # PostgreSQL: password, and other methods
    "no pg_hba.conf entry",
    "does not exist",  # the database or the role
    "is not permitted to log in",
    "no password supplied",
    "permission denied for database",
    "access denied for user",  # MySQL
    "unknown database",
    "is not allowed to connect",
    "login failed for user",  # SQL Server
)


def driver_line(err: BaseException) -> str:
    """The line of a driver error (SQLAlchemy's wrapper unwrapped) that says what happened: the
    refusal where there is one (libpq writes a line per address it tried, `localhost`'s ::1
    refused before 127.0.0.1's FATAL), else the first. It names the host, the user and the
    database, never a password or a record."""
    lines = [line for line in str(getattr(err, "orig", None) or err).splitlines() if line.strip()]
    refusals = [line for line in lines if login_refused(line)]
    return (refusals or lines or [type(err).__name__])[0].strip()


def login_refused(text: str) -> bool:
    """Whether a connection error is the server refusing the login or database (a setting to
    fix), not a server that does not answer."""
    return any(words in text.lower() for words in _REFUSALS)


def database_error(uri: str, err: BaseException) -> Exception:
    """The error of a database store that could not be connected to: a ConfigError when the
    server refused the login or the database, else a ServerError (retried); its URL without
    the password and the driver's first line."""
    from privtune.errors import ConfigError, ServerError

    first = driver_line(err)
    if login_refused(first):
        return ConfigError(
            TRACKING_ENV,
            f"the MLflow store's database server refused {redact(uri)} ({first})",
            "check the user, password and database name in the URL (MLflow does not create "
            f"the database: createdb NAME), or unset {TRACKING_ENV} to use the project's own "
            "sqlite store",
        )
    return ServerError(
        TRACKING_ENV,
        f"the MLflow store's database {redact(uri)} does not answer ({first})",
        "start it (PostgreSQL: pg_isready -h HOST -p PORT) or check the URL; unset "
        f"{TRACKING_ENV} to use the project's own sqlite store",
    )


def check_database(uri: str, timeout: int = 5) -> None:
    """A database store must accept a connection now. MLflow's SqlAlchemyStore retries its
    first connection for minutes (2.5 measured against a closed PostgreSQL port) and then
    raises the driver's error, a traceback; this fails within ``timeout`` seconds, naming the
    setting (a refused login or database: ConfigError). Once per store and process."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0]
    if scheme not in DATABASE_SCHEMES or uri in _REACHED:
        return
    import sqlalchemy

    args = {"connect_timeout": timeout} if scheme in ("postgresql", "mysql") else {}
    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool, connect_args=args)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.OperationalError as err:
        raise database_error(uri, err) from None
    finally:
        engine.dispose()
    _REACHED.add(uri)


def checked_uri(root: str | Path = ".") -> str:
    """tracking_uri(root), checked to answer when it is a server or a database, and created
    (when it is a missing sqlite file) by one process at a time."""
    uri = tracking_uri(root)
    check_server(uri)
    check_database(uri)
    _create_sqlite_store(uri)
    return uri


_OPENED: set[str] = set()  # the sqlite stores this process has opened


def _create_sqlite_store(uri: str, wait: float = 600.0) -> None:
    """Open a sqlite store once per process under a file lock: MLflow creates and migrates a
    missing store on first use, and two processes doing that at once (stages or fine-tunings
    started together on a fresh project) collide on its tables. The lock lives in the temp
    directory (a sqlite store is one machine's), so the project gains no untracked file."""
    if not uri.startswith("sqlite:///") or uri in _OPENED:
        return
    import hashlib
    import tempfile

    import mlflow
    from filelock import FileLock

    path = Path(uri.removeprefix("sqlite:///")).resolve()
    key = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    with FileLock(Path(tempfile.gettempdir()) / f"privtune-mlflow-{key}.lock", timeout=wait):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)  # creates and migrates it
    _OPENED.add(uri)


def project_experiment(root: str | Path = ".") -> str:
    """The MLflow experiment of the project at ``root``: its params.yaml's
    `tracking.experiment` (a profile's project: `<experiment>-<profile>`)."""
    from privtune.config import load_params

    path = Path(root) / "params.yaml"
    return load_params(path).tracking.experiment if path.is_file() else EXPERIMENT


def ensure_experiment(root: str | Path = ".", name: str | None = None) -> str:
    """Create the project's store and experiment now, if missing: before runs start at once
    (the store's creation takes turns, `checked_uri`; the experiment is then made once here
    instead of raced for)."""
    with use_store(root) as mlflow:
        return _experiment_id(mlflow, Path(root), name or project_experiment(root))


def _experiment_id(mlflow: Any, root: Path, name: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        # Artifacts beside the store's file, not under whichever directory the first run
        # happened to start in (MLflow's default): every stage and worker finds them.
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    from mlflow.exceptions import MlflowException

    try:
        experiment_id = mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as err:
        # Two workers starting their first run on a shared server at once: one creates it.
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow.get_experiment_by_name(name).experiment_id
    describe_experiment(mlflow.MlflowClient(), experiment_id)
    return experiment_id


# -- what a reviewer reads in the UI ---------------------------------------------------------

NOTE_TAG = "mlflow.note.content"  # the markdown description MLflow shows on runs and experiments
# MLflow 3 opens experiments in its GenAI view unless told otherwise. MLflow 3.17's UI reads
# the view from `?workflowType=machine_learning` (or its sidebar switch, kept in the browser);
# the experiment kind tag is what the UI's own "Machine learning" choice writes, kept so the
# experiment is typed for model training wherever MLflow reads it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A saved view of the runs table (the UI's "Views" menu and ?viewStateShareKey=<id>): MLflow
# has no per-experiment default columns, so the headline columns are chosen here.
SAVED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
HEADLINE_VIEW = "privtune-headline"
HEADLINE_COLUMNS = (  # in this order: the audit's lower bound beside the epsilon it must not pass
    "params.`method`",
    "params.`private`",
    "metrics.`epsilon`",
    "metrics.`attack.audit_epsilon_lower_bound`",
    "metrics.`target_epsilon`",
    "params.`delta`",
    "metrics.`test_perplexity`",
    "metrics.`attack.mia_auc_max`",
    "metrics.`attack.mia_tpr_at_fpr_0.01_max`",
)

# Final values of a fine-tuning run, by the name MLflow shows (finetune.json keeps its own
# names). They are logged at the run's last step, so a per-step curve of the same name
# (epsilon) ends at its final value instead of jumping back to step 0; a final value that
# means something else than the per-step series gets its own name.
FINAL_METRIC_NAMES = {
    "epsilon": "epsilon",
    "epsilon_rdp": "epsilon_rdp_looser_bound",
    "target_epsilon": "target_epsilon",
    "delta": "delta",
    "sample_rate": "sample_rate",
    "valid_perplexity": "valid_perplexity",
    "noise_multiplier": "noise_multiplier_calibrated",
}

METRIC_GLOSSARY = """\
| metric | what it is |
|---|---|
| `epsilon` | ε spent after each step, by the run's accountant (`finetune.accountant`; RDP for \
LMO steps): an upper bound. Its last point, at the last step, is the run's final ε. |
| `target_epsilon`, `delta` | the contract: the ε the run may spend at most, and its δ. |
| `epsilon_rdp_looser_bound` | the same ledger converted through RDP: a looser upper bound, \
shown for comparison only (the claim is `epsilon`). |
| `noise_multiplier` | each step's effective noise multiplier z (per step). |
| `noise_multiplier_calibrated` | the constant z that spends the target over the planned \
steps (what a fixed-noise method uses). |
| `loss`, `valid_loss` | training loss of the step's batch, and validation loss on \
`finetune.eval_records` records (nats per token, per step). |
| `valid_perplexity` | perplexity on the whole validation split after training. |
| `test_perplexity`, `medication_accuracy` | utility on the test split (`evaluate` stage). |
| `attack.mia_auc_max`, `attack.mia_tpr_at_fpr_0.01_max` | the strongest of the four \
membership-inference scores: ROC AUC (0.5 = chance) and true-positive rate at 1 % false \
positives (0.01 = chance). |
| `attack.audit_epsilon_lower_bound` | the one-run audit's lower bound on ε (white-box \
gradient canaries and black-box text canaries, the larger); it must stay at or below \
`epsilon`. |

Evaluation and attack results are attached by the `register` stage at the last training step;
the registered version's description and its privacy model card (`model_card.md`) give the
verdict."""

EXPERIMENT_NOTE = f"""\
**privtune: differentially private LoRA fine-tuning.** One run per method entry of \
`params.yaml: methods` (run name = entry, e.g. `dpsgd`), all at the same target (ε, δ), plus a \
`report` run with every method side by side.

Headline columns: open **Views → privacy headline** (method, private, ε spent and target, δ, test \
perplexity, best membership-inference AUC and TPR at 1 % FPR, audit lower bound). The verdict \
on each model (promoted or refused, and why) is on its version of the registered model.

{METRIC_GLOSSARY}"""


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The floats of a run's final metrics under the names MLflow shows (FINAL_METRIC_NAMES);
    other numbers keep their names, flags and labels are left out."""
    return {
        FINAL_METRIC_NAMES.get(key, key): float(value)
        for key, value in metrics.items()
        if isinstance(value, float)
    }


def finetune_note(name: str, method: str, target_epsilon: float | None) -> str:
    """A fine-tuning run's description: what it trained and what its headline metrics mean."""
    contract = (
        f"under the target ε = {target_epsilon:g} (δ is the run's `delta` parameter; "
        "`finetune.delta` is what params.yaml asked for: null, 1/(10 N) within the delta gate)"
        if target_epsilon is not None
        else "without differential privacy (no ε: the utility ceiling)"
    )
    return f"Fine-tuning of entry `{name}` (method `{method}`) {contract}.\n\n{METRIC_GLOSSARY}"


# The view shows the fine-tuning runs only (the report run has none of these numbers).
HEADLINE_FILTER = "tags.stage = 'finetune'"


def headline_view_state() -> dict[str, Any]:
    """The runs-table state MLflow's UI restores for the headline view: the fine-tuning runs,
    the headline columns, each wide enough for its name and a full-precision value (MLflow's
    100 px cut both to "0.5694222..." and "attack.mia_auc_"; 140 px still cut δ's
    "9.671179883945841e-05" and "237.08598297068512" after about 16 characters)."""
    text = ("params.`method`", "params.`private`")  # the rest hold numbers (delta a param)
    widths = {  # pixels: about 7 a character of the name, 190 for a number's 21 characters
        column: max(110 if column in text else 190, 7 * len(name) + 28)
        for column in HEADLINE_COLUMNS
        for name in [column.split("`")[1]]
    }
    return {
        "selectedColumns": list(HEADLINE_COLUMNS),
        "columnOrder": list(HEADLINE_COLUMNS),  # the UI applies widths along an order
        "columnWidths": widths,
        "searchFilter": HEADLINE_FILTER,
    }


def describe_experiment(client: Any, experiment_id: str) -> None:
    """Description, model-training kind and the headline view on the experiment; tags already
    holding the same content are left alone (a view keeps its creation time)."""
    tags = dict(client.get_experiment(experiment_id).tags)
    wanted = {NOTE_TAG: EXPERIMENT_NOTE, EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    view_tag = SAVED_VIEW_TAG_PREFIX + HEADLINE_VIEW
    state = json.dumps(headline_view_state(), sort_keys=True)
    try:
        current_state = json.loads(tags[view_tag])["state"]
    except (KeyError, ValueError, TypeError):
        current_state = None
    if current_state != state:
        now = int(time.time() * 1000)
        envelope = {"name": "privacy headline", "createdAt": now, "updatedAt": now}
        wanted[view_tag] = json.dumps(envelope | {"state": state})
    for key, value in wanted.items():
        if tags.get(key) != value:
            client.set_experiment_tag(experiment_id, key, value)


def headline_url(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The runs table in MLflow's model-training view with the headline columns."""
    return (
        f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={HEADLINE_VIEW}"
    )


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> dotted keys, as MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def git_commit(root: str | Path = ".") -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# What the pipeline itself rewrites in git (its tracked outputs): not a change to what trained.
PIPELINE_OUTPUTS = ("dvc.lock", "metrics", "plots", "reports")


def git_modified(root: str | Path = ".") -> str:
    """The tracked files changed since `git_commit` (uncommitted params, code), the pipeline's
    own outputs left out: "none" for a clean checkout, "unknown" outside git. Beside the commit
    it says whether that commit is all that trained the model (names only, never contents).
    A profile's project (profiles/<name>/, git-ignored) was built from the checkout: the
    checkout's changes count, and so do its own copies edited since (`profile_edits`)."""
    root = Path(root).resolve()
    profile = _profile_checkout(root)
    where = profile if profile is not None else root
    excluded = [f":(exclude){path}" for path in PIPELINE_OUTPUTS]
    cmd = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded]
    try:
        out = subprocess.run(cmd, cwd=where, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    files = sorted(line[3:].strip() for line in out.splitlines() if line.strip())
    if profile is not None:
        try:
            files += profile_edits(root, profile)
        except Exception:  # provenance is reported, never fatal: a checkout that changed since
            rel = root.relative_to(profile).as_posix()
            files.append(f"{rel} (not compared with the checkout: rebuild it to know)")
    shown = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
    return shown or "none"


# Where privtune.profiles builds a profile's project, and the record of what it was built of
# (here, not there: importing privtune.profiles would make every stage depend on them all).
PROFILES_DIR = Path("profiles")
BUILT_FROM = "built-from.json"


def _profile_checkout(root: Path) -> Path | None:
    """The checkout a profile's project under it was built from (None: ``root`` is no
    profile's project): git sees nothing of profiles/<name>/, which it ignores."""
    checkout = root.parent.parent
    if root.parent != checkout / PROFILES_DIR or not (checkout / "dvc.yaml").is_file():
        return None
    cmd = ["git", "check-ignore", "-q", str(root)]
    try:
        ignored = subprocess.run(cmd, cwd=checkout, capture_output=True)
    except OSError:  # no git: the status below says "unknown"
        return None
    return checkout if ignored.returncode == 0 else None


def profile_edits(root: Path, checkout: Path) -> list[str]:
    """A profile's copies edited in place since `privtune.profiles` made them (then run with
    `dvc repro` there): its code and dvc.yaml against the checkout's, its params.yaml against
    the digest of what was written (`BUILT_FROM`)."""
    import filecmp
    import hashlib

    edits = []
    name = root.relative_to(checkout).as_posix()
    if not filecmp.cmp(root / "dvc.yaml", checkout / "dvc.yaml", shallow=False):
        edits.append(f"{name}/dvc.yaml")
    for path in sorted((checkout / "src").rglob("*.py")):
        copy = root / path.relative_to(checkout)
        if not copy.is_file() or not filecmp.cmp(path, copy, shallow=False):
            edits.append(f"{name}/{path.relative_to(checkout).as_posix()}")
    built = json.loads((root / BUILT_FROM).read_text())
    written = hashlib.sha256((root / "params.yaml").read_bytes()).hexdigest()
    if written != built["params_sha256"]:
        edits.append(f"{name}/params.yaml")
    return edits


class RunTracker:
    """A live MLflow run: params, step metrics, final metrics and artifacts."""

    def __init__(self, mlflow: Any, run: Any) -> None:
        self._mlflow = mlflow
        self.run_id: str = run.info.run_id
        self.reused_from: str | None = None  # a copy's run that trained (`copy_run`)

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {k: ("null" if v is None else v) for k, v in flatten(params).items()}
        self._mlflow.log_params(flat)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        finite = {
            k.replace("/", "."): float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(v)
        }
        if finite:
            self._mlflow.log_metrics(finite, step=step)

    def last_step(self, key: str = "loss") -> int:
        """The last step ``key`` was logged at in this run (-1: none): a run resumed from its
        checkpoint replays the steps after it, which the killed attempt may have logged."""
        history = self._mlflow.MlflowClient().get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=-1)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dir_contents(self, path: str | Path) -> None:
        """Every file and folder of ``path`` at the root of the run's artifacts."""
        self._mlflow.log_artifacts(str(path))


RUN_KEY_TAG = "privtune.run_key"


def _client(root: str | Path) -> Any:
    disable_telemetry()
    import mlflow

    return mlflow.MlflowClient(checked_uri(root))


def _runs_with_key(root: str | Path, key: str) -> list[Any]:
    """Every run of the store with this key, whatever its experiment: a key is a stage and its
    inputs, so a run with it in another experiment (`tracking.experiment` renamed, a profile
    whose inputs are the default's) is the same release, which must not be made twice."""
    client = _client(root)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    return client.search_runs(experiments, filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'")


def running_elsewhere(root: str | Path, key: str) -> Any | None:
    """A run with this key (any experiment) that another live process is making now, else
    None. Runs left RUNNING by the dead are closed first (`close_dead_runs` in their
    experiment); this process's own open runs are not another's, and a run whose heartbeats
    stopped is not waited for even where its pid still answers (a pid the system reused)."""
    client = _client(root)
    mine = _owner_tags()
    for run in _runs_with_key(root, key):
        if run.info.status != "RUNNING":
            continue
        if all(run.data.tags.get(tag) == value for tag, value in mine.items()):
            continue
        close_dead_runs(root, client.get_experiment(run.info.experiment_id).name)
        found = client.get_run(run.info.run_id)
        beating = _heartbeat_stopped(found.data.tags, datetime.now(UTC)) is None
        if found.info.status == "RUNNING" and beating:
            return found
    return None


def finished_run(root: str | Path, key: str, experiment: str | None = None) -> Any | None:
    """The latest FINISHED run with this key (same stage and inputs), if any: one filed in
    ``experiment`` (a name) first; elsewhere, a run that trained before a copy of one."""
    runs = [r for r in _runs_with_key(root, key) if r.info.status == "FINISHED"]
    if experiment is not None:
        here_id = _id_of(root, experiment)
        here = [r for r in runs if r.info.experiment_id == here_id]
        runs = here or [r for r in runs if REUSED_FROM_TAG not in r.data.tags] or runs
    return max(runs, key=lambda r: r.info.start_time) if runs else None


def resumable_run(root: str | Path, run_id: str) -> bool:
    """Whether a checkpoint's MLflow run can be reopened in the project's store: it is there
    and not deleted (the store may have changed since, `MLFLOW_TRACKING_URI` set to a team
    server, or the run deleted in MLflow's UI)."""
    from mlflow.exceptions import MlflowException

    try:
        run = _client(root).get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise  # the store did not answer: not a missing run
        return False
    return run.info.lifecycle_stage == "active"


def _id_of(root: str | Path, experiment: str) -> str | None:
    """The id of the experiment named ``experiment`` (None: the store has none)."""
    found = _client(root).get_experiment_by_name(experiment)
    return None if found is None else found.experiment_id


def in_experiment(root: str | Path, run: Any, experiment: str) -> bool:
    """Whether ``run`` is filed in the experiment named ``experiment``."""
    return run.info.experiment_id == _id_of(root, experiment)


def experiment_name(root: str | Path, run: Any) -> str:
    """The name of the experiment ``run`` is filed in."""
    return _client(root).get_experiment(run.info.experiment_id).name


REUSED_FROM_TAG = "privtune.reused_from"  # a copy's run that trained (same stage and inputs)
_COPY_NOTE_END = "\n\n---\n\n"  # between a copy's own paragraph and its source's description


def _trained_run(client: Any, source: Any) -> Any:
    """The run that trained what ``source`` holds: itself, or the one a copy names (the copy,
    when that one was deleted)."""
    from mlflow.exceptions import MlflowException

    original = source.data.tags.get(REUSED_FROM_TAG)
    if original is None:
        return source
    try:
        return client.get_run(original)
    except MlflowException:
        return source


@contextlib.contextmanager
def copy_run(root: str | Path, source: Any, *, key: str, experiment: str) -> Iterator[RunTracker]:
    """A run in ``experiment`` that carries what ``source`` (a finished run, filed elsewhere)
    logged while it ran: its params, its tags and description, and its metric curves (points
    attached after it ended, such as another project's evaluation, stay behind). Yields the open
    copy for the caller's artifacts. Its tag `privtune.reused_from` and the top of its
    description name the run that trained (the source, or the run a copied source names), with
    when and how long. Why not one run in two experiments: MLflow files a run in one, and a
    project's registry versions, results and UI view read its own experiment."""
    from mlflow.entities import Metric, Param, RunTag

    client = _client(root)
    end = source.info.end_time or int(time.time() * 1000)
    trained = _trained_run(client, source)
    # Not taken over: MLflow's own tags (it sets the copy's) and the source's process,
    # heartbeat and error (the copy is a run of its own).
    own = {PID_TAG, HOST_TAG, PID_NAMESPACE_TAG, HEARTBEAT_TAG, HEARTBEAT_SECONDS_TAG, ERROR_TAG}
    tags = {
        k: v
        for k, v in source.data.tags.items()
        if k not in own | {RUN_KEY_TAG, NOTE_TAG} and not k.startswith("mlflow.")
    }
    tags[REUSED_FROM_TAG] = trained.info.run_id
    began = datetime.fromtimestamp(trained.info.start_time / 1000, UTC)
    took = ((trained.info.end_time or end) - trained.info.start_time) / 1000
    note = (
        f"**A copy of run `{trained.info.run_id}`** (experiment `{experiment_name(root, trained)}`"
        f"), which trained this model on {began:%Y-%m-%d %H:%M} UTC in {took:.0f} s: the same "
        "stage and inputs, so the same release, not trained again. Its params, tags, curves and "
        "artifacts are copied here; this project's evaluation and registration are its own."
    )
    described = source.data.tags.get(NOTE_TAG, "").split(_COPY_NOTE_END, 1)[-1]
    tags[NOTE_TAG] = f"{note}{_COPY_NOTE_END}{described}" if described else note
    with start_run(source.info.run_name, root=root, key=key, experiment=experiment) as run:
        params = [Param(k, v) for k, v in source.data.params.items()]
        for start in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000
            client.log_batch(run.run_id, params=params[start : start + 100])
        points = [
            Metric(m.key, m.value, m.timestamp, m.step)
            for name in source.data.metrics
            for m in client.get_metric_history(source.info.run_id, name)
            if m.timestamp <= end
        ]
        for start in range(0, len(points), 1000):
            client.log_batch(run.run_id, metrics=points[start : start + 1000])
        client.log_batch(run.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        run.reused_from = trained.info.run_id
        yield run


def discard_unfinished(
    root: str | Path, key: str, keep: str | None = None, experiment: str | None = None
) -> int:
    """Delete runs with this key that ended without finishing (a crashed attempt), so a retry
    does not leave a duplicate beside its own run; ``keep``: a run to resume instead;
    ``experiment``: only those filed there (another project's failed runs are its own). A run
    still RUNNING is left alone: its process may be alive on another machine sharing the store
    (the dead ones were closed as KILLED first, `close_dead_runs`: this machine's by their
    pid, another's by their silent heartbeats). Returns how many were deleted."""
    client = _client(root)
    here_id = None if experiment is None else _id_of(root, experiment)
    stale = [
        r
        for r in _runs_with_key(root, key)
        if r.info.status not in ("FINISHED", "RUNNING")
        and r.info.run_id != keep
        and (experiment is None or r.info.experiment_id == here_id)
    ]
    for run in stale:
        client.delete_run(run.info.run_id)
    return len(stale)


def attach_metrics(
    root: str | Path,
    run_id: str,
    metrics: Mapping[str, float],
    step: int,
    model_id: str | None = None,
) -> None:
    """Log metrics onto a finished run (and its logged model) through the client API: the run
    stays closed, so its duration remains the training's. Non-finite values are left out, as
    in RunTracker.log_metrics."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(key.replace("/", "."), float(value), now, step, model_id=model_id)
        for key, value in metrics.items()
        if math.isfinite(value)
    ]
    if batch:
        _client(root).log_batch(run_id, metrics=batch)


def download_run_artifacts(root: str | Path, run_id: str, destination: str | Path) -> Path:
    """Copy every artifact of a run into ``destination`` (a directory)."""
    disable_telemetry()
    import mlflow

    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, dst_path=str(destination), tracking_uri=tracking_uri(root)
    )
    return Path(path)


@contextlib.contextmanager
def isolated_store() -> Iterator[None]:
    """MLflow's tracking URI (its global and MLFLOW_TRACKING_URI) back as it was on exit.

    ``mlflow.set_tracking_uri`` also writes MLFLOW_TRACKING_URI into os.environ (for
    subprocesses), so without this a second project in the same process (a flow, a test, the
    CLI's main() called twice) would silently log into the first one's store. Imports nothing.
    """
    saved_env = os.environ.get(TRACKING_ENV)
    service = sys.modules.get("mlflow.tracking._tracking_service.utils")
    saved_uri = getattr(service, "_tracking_uri", None)
    try:
        yield
    finally:
        service = sys.modules.get("mlflow.tracking._tracking_service.utils")
        if service is not None:
            service._tracking_uri = saved_uri  # type: ignore[attr-defined]
        if saved_env is None:
            os.environ.pop(TRACKING_ENV, None)
        else:
            os.environ[TRACKING_ENV] = saved_env


@contextlib.contextmanager
def use_store(root: str | Path = ".") -> Iterator[Any]:
    """The mlflow module pointed at the project's store inside, and back as it was after."""
    disable_telemetry()
    # MLflow prints a server run's links on stdout, which is a stage command's JSON result:
    # start_run says where the run is on stderr instead
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import mlflow

    with isolated_store():
        mlflow.set_tracking_uri(checked_uri(root))
        yield mlflow


# -- interrupted runs --------------------------------------------------------------------------

PID_TAG = "privtune.pid"  # the process that opened the run, and its machine: a later start
HOST_TAG = "privtune.host"  # in the same pid namespace closes it when that process is gone
ERROR_TAG = "privtune.error"  # why a run did not finish: the error's class and our message
HEARTBEAT_TAG = "privtune.heartbeat"  # the open run's last sign of life (UTC): a start on any
HEARTBEAT_SECONDS_TAG = "privtune.heartbeat_seconds"  # machine judges a run of another by it
HEARTBEAT_ENV = "PRIVTUNE_RUN_HEARTBEAT_SECONDS"
HEARTBEAT_SECONDS = 60.0
MISSED_HEARTBEATS = 5  # beats a run may miss (a slow store, clocks apart) before it is dead


# Where the run's pid names one process: the kernel's boot id and the pid namespace. Two
# machines can share a host name (cloned VMs), and containers on one host's network share its
# name but not its pids; a run whose tag differs is judged by its heartbeats instead.
PID_NAMESPACE_TAG = "privtune.pid_namespace"


def pid_namespace() -> str:
    """This process's boot and pid namespace (Linux); elsewhere the host name, as before."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")  # e.g. pid:[4026531836]
    except OSError:
        return socket.gethostname()
    return f"{boot}/{namespace}"


def _owner_tags() -> dict[str, str]:
    return {
        PID_TAG: str(os.getpid()),
        HOST_TAG: socket.gethostname(),
        PID_NAMESPACE_TAG: pid_namespace(),
    }


def _pid_is_ours(tags: Mapping[str, str]) -> bool:
    """Whether the run's process id can be looked up here (a run opened before the namespace
    tag: when it was opened on a machine of this name)."""
    if PID_NAMESPACE_TAG in tags:
        return tags[PID_NAMESPACE_TAG] == pid_namespace()
    return tags.get(HOST_TAG) == socket.gethostname()


def heartbeat_seconds() -> float:
    """How often an open run beats: PRIVTUNE_RUN_HEARTBEAT_SECONDS, else 60 s."""
    raw = os.environ.get(HEARTBEAT_ENV)
    if raw is None:
        return HEARTBEAT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        from privtune.errors import ConfigError

        raise ConfigError(HEARTBEAT_ENV, f"must be a number of seconds > 0, got {raw!r}",
                          f"unset it (every {HEARTBEAT_SECONDS:g} s) or set e.g. 30")  # fmt: skip
    return value


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class _Heartbeat:
    """Beats into the open run's ``privtune.heartbeat`` tag from a daemon thread, so a start on
    another machine sharing the store can tell a live run from one whose machine died. A beat
    that fails (the store busy or unreachable) is skipped; if another start closed the run as
    dead meanwhile (the store was out of reach for minutes), the next beat reopens it."""

    def __init__(self, client: Any, run_id: str, interval: float) -> None:
        self.client, self.run_id, self.interval = client, run_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="privtune-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - a missed beat is not the run's failure
                continue

    def _beat(self) -> None:
        """One beat; each write first checks that the run is still open here, so a beat that
        was slow to answer does not reopen a run this process has just ended."""
        run = self.client.get_run(self.run_id)
        if run.info.status == "KILLED" and _judged_dead(run.data.tags):
            if self._stop.is_set():
                return
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.delete_tag(self.run_id, ERROR_TAG)
        if not self._stop.is_set():
            self.client.set_tag(self.run_id, HEARTBEAT_TAG, _now())

    def stop(self) -> None:
        """No beat starts after this returns; one already writing to an unreachable store is
        left to its own timeout after 30 s."""
        self._stop.set()
        self._thread.join(timeout=30)
        try:  # judged dead while it was alive, then ended before its next beat: not dead
            if _judged_dead(self.client.get_run(self.run_id).data.tags):
                self.client.delete_tag(self.run_id, ERROR_TAG)
        except Exception:  # noqa: BLE001 - the run's end is recorded next, whatever this does
            pass


NO_HEARTBEAT = "KilledProcess: no heartbeat"


def _judged_dead(tags: Mapping[str, str]) -> bool:
    return tags.get(ERROR_TAG, "").startswith(NO_HEARTBEAT)


def _heartbeat_stopped(tags: Mapping[str, str], now: datetime) -> str | None:
    """Why a RUNNING run's beats say its process is gone (None: alive, or it never beat: a
    run opened by an older privtune is not judged)."""
    try:
        beat = datetime.fromisoformat(tags[HEARTBEAT_TAG])
        interval = float(tags[HEARTBEAT_SECONDS_TAG])
    except (KeyError, ValueError):
        return None
    if beat.tzinfo is None or not (math.isfinite(interval) and interval > 0):
        return None
    silent = (now - beat).total_seconds()
    if silent <= MISSED_HEARTBEATS * interval:
        return None
    return (
        f"{NO_HEARTBEAT} from {tags.get(HOST_TAG, 'its machine')} since {tags[HEARTBEAT_TAG]} "
        f"({silent:.0f} s, every {interval:g} s): its process or machine is gone"
    )


def error_summary(err: BaseException) -> str:
    """What a failed run's tag says: the class, and the message only for our own errors, which
    never hold record text (a library's message might quote an input)."""
    from privtune.errors import AuditViolation, BudgetExhausted, PrivtuneError

    name = type(err).__name__
    if isinstance(err, PrivtuneError | BudgetExhausted | AuditViolation):
        return f"{name}: {err}"[:5000]
    if isinstance(err, KeyboardInterrupt):
        return f"{name}: interrupted"
    return f"{name} (message withheld: it may quote input data; see the stage's log)"


def close_dead_runs(root: str | Path = ".", experiment: str = EXPERIMENT) -> list[str]:
    """Mark KILLED the runs left RUNNING by a process that no longer exists (kill -9, a power
    cut, a lost machine), with why in ``privtune.error``; returns their ids. A run whose
    process this machine can look up (same boot and pid namespace) is judged by its process
    id; any other by its heartbeats (none for MISSED_HEARTBEATS of its intervals), even when
    its machine has this one's name."""
    from privtune.io import pid_alive

    client = _client(root)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    host, now = socket.gethostname(), datetime.now(UTC)
    closed = []
    for run in client.search_runs(
        [found.experiment_id], filter_string="attributes.status = 'RUNNING'"
    ):
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if _pid_is_ours(tags) and pid.isdigit():
            if pid_alive(int(pid)):
                continue
            why = f"KilledProcess: process {pid} on {host} ended without closing the run"
        else:
            why = _heartbeat_stopped(tags, now)
            if why is None:
                continue
        if client.get_run(run.info.run_id).info.status != "RUNNING":
            continue  # it ended meanwhile (MLflow has no compare-and-set: a narrower window)
        client.set_tag(run.info.run_id, ERROR_TAG, why)
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


@contextlib.contextmanager
def start_run(
    run_name: str | None = None,
    *,
    root: str | Path = ".",
    run_id: str | None = None,
    experiment: str = EXPERIMENT,
    key: str | None = None,
) -> Iterator[RunTracker]:
    """Open (or reopen, with run_id) an MLflow run in the project's store.

    ``key`` tags the run with its stage and inputs, so a retry can find (and reuse or discard)
    an earlier attempt instead of duplicating it. The run records its process (pid, host) so
    that a later start can close it if that process dies; a run that ends by an exception is
    FAILED (KILLED for an interrupt) with the error's class and message in ``privtune.error``.
    """
    root = Path(root)
    interval = heartbeat_seconds()
    close_dead_runs(root, experiment)
    with use_store(root) as mlflow:
        tags = {RUN_KEY_TAG: key} if key else {}
        tags |= _owner_tags() | {HEARTBEAT_TAG: _now(), HEARTBEAT_SECONDS_TAG: f"{interval:g}"}
        client = mlflow.MlflowClient(mlflow.get_tracking_uri())  # this store's, for the beats too
        if run_id is not None:
            if ERROR_TAG in client.get_run(run_id).data.tags:
                client.delete_tag(run_id, ERROR_TAG)  # resumed: the interruption is over
            context = mlflow.start_run(run_id=run_id)
        else:
            experiment_id = _experiment_id(mlflow, root, experiment)
            context = mlflow.start_run(run_name=run_name, experiment_id=experiment_id, tags=tags)
        run = context.__enter__()
        if run_id is not None:
            mlflow.set_tags(tags)
        heartbeat = _Heartbeat(client, run.info.run_id, interval)
        try:
            yield RunTracker(mlflow, run)
        except BaseException as err:
            heartbeat.stop()
            mlflow.set_tag(ERROR_TAG, error_summary(err))
            status = "KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED"
            mlflow.end_run(status=status)
            raise
        heartbeat.stop()
        context.__exit__(None, None, None)
        uri = mlflow.get_tracking_uri()
        if uri.startswith(("http://", "https://")):  # a server: where a reviewer finds the run
            where = f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs"
            from privtune.progress import notice

            notice(f"MLflow run {run.info.run_name}: {where}/{run.info.run_id}")
