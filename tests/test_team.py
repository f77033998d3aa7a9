"""The team deployment (privtune.team): MLflow and Prefect servers on PostgreSQL.

Fast tests: URLs, the client environment, and every way it can be misconfigured (each a clear
error naming the setting and the fix, never a password). The slow tests start both servers
against the local PostgreSQL ($PRIVTUNE_TEST_POSTGRES_URL, default root@127.0.0.1:5432) in
fresh databases dropped afterwards, run two fine-tunings at once as two Prefect flow runs from
two worker checkouts (no shared filesystem: artifacts go through the MLflow server), then
register from both workers at once and promote through a Prefect flow.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from privtune import team, tracking
from privtune.errors import ConfigError, ServerError
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEST_POSTGRES = os.environ.get(
    "PRIVTUNE_TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/postgres"
)
MODEL = "privtune-clinical-notes"


# -- fast: URLs, environment, bad input ---------------------------------------------------------


def test_database_urls_carry_the_driver_and_hide_the_password_in_messages():
    server = "postgresql://alice:s3cret@db.internal:5433/postgres"
    assert team.database_url(server, "privtune_prefect", "asyncpg") == (
        "postgresql+asyncpg://alice:s3cret@db.internal:5433/privtune_prefect"
    )
    config = team.TeamConfig(postgres=server)
    assert team.mlflow_store_uri(config) == (
        "postgresql://alice:s3cret@db.internal:5433/privtune_mlflow"
    )
    assert "s3cret" not in team.redact(server) and "alice" in team.redact(server)


@pytest.mark.parametrize(
    "url", ["sqlite:///mlflow.db", "mysql://root@127.0.0.1/x", "not a url", "postgresql:///db"]
)
def test_a_url_that_is_not_postgresql_is_refused_naming_the_setting(url):
    with pytest.raises(ConfigError) as err:
        team.database_url(url, "privtune_mlflow")
    message = str(err.value)
    assert "--postgres" in message and team.POSTGRES_ENV in message
    assert "postgresql://USER" in message  # the fix shows the form


def test_unreachable_postgres_names_the_setting_and_the_fix_without_the_password():
    url = f"postgresql://alice:s3cret@127.0.0.1:{free_port()}/postgres"
    started = time.monotonic()
    with pytest.raises(ServerError) as err:
        team.check_postgres(url)
    assert time.monotonic() - started < 10
    message = str(err.value)
    assert team.POSTGRES_ENV in message and "not reachable" in message
    assert "pg_isready" in message and "s3cret" not in message


def test_team_up_with_unreachable_postgres_exits_6_and_starts_nothing(tmp_path, capsys):
    url = f"postgresql://root@127.0.0.1:{free_port()}/postgres"
    home = tmp_path / "home"
    code = team.main(["up", "--postgres", url, "--home", str(home)])
    assert code == 6
    assert "not reachable" in capsys.readouterr().err
    assert not home.exists()  # no log, no artifacts directory, no server


def test_a_port_in_use_is_named_with_its_option(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = ["--mlflow-port", str(free_port()), "--prefect-port", str(port)]
        code = team.main(["up", *ports, "--home", str(tmp_path / "h")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--prefect-port" in err and f"127.0.0.1:{port}" in err and "choose another" in err


@pytest.mark.parametrize(
    ("ports", "says"),
    [
        (["--mlflow-port", "99999"], "99999 is not a port: use 1 to 65535"),
        (["--prefect-port", "-1"], "-1 is not a port"),
        (["--prefect-port", "0"], "0 is not a port"),
        (["--mlflow-port", "http"], "'http' is not a port number"),
        (["--mlflow-port", "5714", "--prefect-port", "5714"], "the same port as --mlflow-port"),
        (["--startup-timeout", "nan"], "nan must be a number above 0"),
        (["--mlflow-workers", "0"], "0 must be a number above 0"),
    ],
)
def test_impossible_ports_are_refused_at_once_naming_the_option(tmp_path, capsys, ports, says):
    """A port out of range was a traceback (OverflowError, exit 1); the same port twice, or
    port 0, waited out the startup timeout (240 s) and then blamed a server (exit 6)."""
    home = tmp_path / "home"
    started = time.monotonic()
    try:
        code = team.main(["up", *ports, "--home", str(home), "--startup-timeout", "30"])
    except SystemExit as done:  # argparse: the usage and the error
        code = done.code
    assert code == 2 and time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and not home.exists()
    option = "--prefect-port" if "the same" in says else ports[0]
    assert option in err


def test_workers_get_the_public_name_of_both_servers(capsys):
    config = team.TeamConfig(host="0.0.0.0", public_host="ml.internal", mlflow_port=5001)
    assert team.client_env(config) == {
        "MLFLOW_TRACKING_URI": "http://ml.internal:5001",
        "PREFECT_API_URL": "http://ml.internal:4200/api",
    }
    assert team.main(["env", "--public-host", "ml.internal"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "export MLFLOW_TRACKING_URI=http://ml.internal:5000",
        "export PREFECT_API_URL=http://ml.internal:4200/api",
    ]


def test_the_tracking_server_in_the_environment_wins_over_the_project_store(tmp_path, monkeypatch):
    from privtune.registry.register import client

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ml.internal:5000")
    assert tracking.tracking_uri(tmp_path) == "http://ml.internal:5000"
    monkeypatch.setattr(tracking, "check_server", lambda uri: None)  # no server needed here
    registry = client(tmp_path)
    assert registry._registry_uri == "http://ml.internal:5000"
    assert registry._tracking_client.tracking_uri == "http://ml.internal:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 404

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("status, up", [(200, True), (404, True), (401, True), (503, False)])
def test_a_tracking_server_is_up_when_it_answers_below_500(status, up):
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        if up:
            tracking.check_server(uri)
        else:
            with pytest.raises(ServerError, match="HTTP 503"):
                tracking.check_server(uri)
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_tracking_server_fails_at_once_naming_the_setting(
    tmp_path, monkeypatch, capsys
):
    """Not MLflow's minutes of retries: exit 6 (retryable, unlike bad input's 2), the setting
    and the fix named, no traceback, and no local store written instead."""
    from privtune.cli import EXIT_UNAVAILABLE, main
    from tests.conftest import write_params

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    write_params(tmp_path / "params.yaml")
    started = time.monotonic()
    with pytest.raises(ServerError) as err, tracking.start_run("x", root=tmp_path):
        pass
    assert "MLFLOW_TRACKING_URI" in str(err.value) and "team-servers" in str(err.value)
    assert main(["--root", str(tmp_path), "promote"]) == EXIT_UNAVAILABLE
    assert time.monotonic() - started < 20
    stderr = capsys.readouterr().err
    assert "MLFLOW_TRACKING_URI" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_an_unreachable_database_store_fails_at_once_naming_the_setting(
    tmp_path, monkeypatch, capsys
):
    """A PostgreSQL store that is down, as the http server above: MLflow's own client retried
    its first connection for 2.5 minutes, then exited 5 with the driver's traceback."""
    from privtune.cli import EXIT_UNAVAILABLE, main
    from tests.conftest import write_params

    uri = f"postgresql://alice:s3cret@127.0.0.1:{free_port()}/test"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    write_params(tmp_path / "params.yaml")
    started = time.monotonic()
    with pytest.raises(ServerError) as err:
        tracking.checked_uri(tmp_path)
    assert "MLFLOW_TRACKING_URI" in str(err.value) and "s3cret" not in str(err.value)
    with pytest.raises(ServerError), tracking.start_run("x", root=tmp_path):
        pass
    assert main(["--root", str(tmp_path), "promote"]) == EXIT_UNAVAILABLE
    assert time.monotonic() - started < 30
    stderr = capsys.readouterr().err
    assert "does not answer" in stderr and "Traceback" not in stderr and "s3cret" not in stderr
    assert not (tmp_path / "mlflow.db").exists()


def _local_postgres(**parts: str) -> str:
    """TEST_POSTGRES with another user or database, or a skip when it does not answer."""
    from sqlalchemy.engine import make_url

    try:
        team.check_postgres(TEST_POSTGRES, timeout=3)
    except (ServerError, ConfigError) as err:
        pytest.skip(f"no PostgreSQL to refuse a login: {err}")
    return make_url(TEST_POSTGRES).set(**parts).render_as_string(hide_password=False)


@pytest.mark.parametrize("refused", ["role", "database"])
def test_a_store_whose_server_refuses_the_login_or_database_is_bad_configuration(
    refused, tmp_path, monkeypatch, capsys
):
    """The server answered and said no (no such role, no such database, a wrong password): a
    retry cannot fix that, so exit 2 (bad configuration, not retried), not 6, naming the
    setting and what to check, without the password and without a traceback."""
    from privtune.cli import EXIT_BAD_INPUT, main
    from tests.conftest import write_params

    if refused == "role":
        uri = _local_postgres(username=f"privtune_nobody_{secrets.token_hex(3)}", password="s3cret")
    else:
        uri = _local_postgres(database=f"privtune_missing_{secrets.token_hex(3)}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    write_params(tmp_path / "params.yaml")
    with pytest.raises(ConfigError) as err:
        tracking.checked_uri(tmp_path)
    message = str(err.value)
    assert "MLFLOW_TRACKING_URI" in message and "refused" in message
    assert re.search("does not exist|authentication failed", message)  # trust or password auth
    assert "s3cret" not in message
    assert main(["--root", str(tmp_path), "promote"]) == EXIT_BAD_INPUT
    stderr = capsys.readouterr().err
    assert "refused" in stderr and "Traceback" not in stderr and "s3cret" not in stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_team_up_with_a_refused_login_exits_2_and_starts_nothing(tmp_path, capsys):
    url = _local_postgres(username=f"privtune_nobody_{secrets.token_hex(3)}", password="s3cret")
    with pytest.raises(ConfigError):
        team.check_postgres(url)
    home = tmp_path / "home"
    assert team.main(["up", "--postgres", url, "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert "refused the login" in err and "role must exist" in err and "s3cret" not in err
    assert not home.exists()


@pytest.mark.parametrize(
    ("first_line", "refused"),
    [
        ('connection to server at "h", port 5432 failed: FATAL:  password authentication '
         'failed for user "alice"', True),
        ('connection to server at "h", port 5432 failed: FATAL:  no pg_hba.conf entry for host '
         '"10.0.0.2", user "alice", database "x", no encryption', True),
        ("(1045, \"Access denied for user 'alice'@'10.0.0.2' (using password: YES)\")", True),
        ("(1049, \"Unknown database 'privtune'\")", True),
        ('connection to server at "h", port 5432 failed: FATAL:  the database system is '
         "starting up", False),
        ('connection to server at "h", port 5432 failed: FATAL:  sorry, too many clients '
         "already", False),
        ('connection to server at "h", port 5432 failed: Connection refused', False),
    ],
)  # fmt: skip
def test_only_a_refusal_is_told_from_a_server_that_may_answer_later(first_line, refused):
    assert tracking.login_refused(first_line) is refused


def test_a_refusal_after_an_address_that_did_not_answer_is_found():
    """libpq writes a line per address it tried: `localhost` on a server listening on IPv4
    only is ::1's "Connection refused" first, then 127.0.0.1's FATAL."""
    err = Exception(
        'connection to server at "localhost" (::1), port 5432 failed: Connection refused\n'
        "\tIs the server running on that host and accepting TCP/IP connections?\n"
        'connection to server at "localhost" (127.0.0.1), port 5432 failed: FATAL:  role '
        '"bob" does not exist\n'
    )
    line = tracking.driver_line(err)
    assert tracking.login_refused(line) and line.endswith('role "bob" does not exist')
    down = Exception('connection to server at "h", port 5432 failed: Connection refused\n\tIs…')
    assert tracking.driver_line(down).endswith("Connection refused")


def test_an_unreachable_server_is_retried_by_the_scheduler():
    from tasks.stages import is_permanent

    down = ServerError("MLFLOW_TRACKING_URI", "down", "start it")
    assert not is_permanent(down)
    assert is_permanent(ConfigError("finetune.epsilon", "negative", "make it positive"))


# -- slow: both servers on PostgreSQL, two workers ---------------------------------------------


class TeamUp:
    """`python -m privtune.team up`, run as a user runs it: its output read for the workers'
    environment, SIGTERM to stop it."""

    def __init__(self, config: team.TeamConfig, process: subprocess.Popen[str]) -> None:
        self.config, self.process = config, process
        self.output: list[str] = []
        self.env: dict[str, str] = {}

    def ready(self) -> dict[str, str]:
        """The environment `up` printed, once both servers are healthy."""
        while len(self.env) < 2:
            line = self.process.stdout.readline()  # type: ignore[union-attr]
            if not line:  # it exited
                self.process.wait()
                raise AssertionError(f"team up exited {self.process.returncode}: {self.output}")
            self.output.append(line)
            if line.startswith("export "):
                key, value = line.removeprefix("export ").strip().split("=", 1)
                self.env[key] = value
        return self.env


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both servers, in two fresh databases (dropped afterwards), on free ports: started
    here, waited for by their first user (so the project builds meanwhile), and stopped by
    SIGTERM, after which nothing listens on their ports."""
    try:
        team.check_postgres(TEST_POSTGRES, timeout=3)
    except ServerError as err:
        pytest.skip(f"no PostgreSQL for the team-deployment tests: {err}")
    name = f"privtune_test_{secrets.token_hex(4)}"
    config = team.TeamConfig(
        postgres=TEST_POSTGRES,
        mlflow_database=f"{name}_mlflow",
        prefect_database=f"{name}_prefect",
        mlflow_port=free_port(),
        prefect_port=free_port(),
        home=tmp_path_factory.mktemp("team-home"),
    )
    argv = [
        sys.executable, "-m", "privtune.team", "up", "--postgres", config.postgres,
        "--mlflow-database", config.mlflow_database,
        "--prefect-database", config.prefect_database,
        "--mlflow-port", str(config.mlflow_port), "--prefect-port", str(config.prefect_port),
        "--home", str(config.home), "--mlflow-workers", "1", "--startup-timeout", "600",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield TeamUp(config, process)
    finally:
        process.terminate()
        rest, _ = process.communicate(timeout=120)
        for database in (config.mlflow_database, config.prefect_database):
            team.drop_database(TEST_POSTGRES, database)
    assert process.returncode == 0, rest
    assert "servers stopped" in rest
    for port in (config.mlflow_port, config.prefect_port):
        team._check_port("127.0.0.1", port, "port")  # raises if a server still listens


@pytest.mark.slow
def test_kill_9_of_team_up_stops_its_servers_too(tmp_path):
    """`team up` starts its servers in sessions of their own (Ctrl-C reaches `up`, which stops
    them in order); a `kill -9` of `up` left both running on, holding the ports, and the next
    `up` said the port was in use. The kernel now stops them with it (PR_SET_PDEATHSIG)."""
    try:
        team.check_postgres(TEST_POSTGRES, timeout=3)
    except ServerError as err:
        pytest.skip(f"no PostgreSQL for the team-deployment tests: {err}")
    name = f"privtune_test_{secrets.token_hex(4)}"
    ports = {"--mlflow-port": free_port(), "--prefect-port": free_port()}
    argv = [
        sys.executable, "-m", "privtune.team", "up", "--postgres", TEST_POSTGRES,
        "--mlflow-database", f"{name}_mlflow", "--prefect-database", f"{name}_prefect",
        *[str(part) for pair in ports.items() for part in pair],
        "--home", str(tmp_path / "home"), "--mlflow-workers", "1", "--startup-timeout", "600",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        config = team.TeamConfig(postgres=TEST_POSTGRES)
        TeamUp(config, process).ready()
        process.kill()
        process.wait(timeout=30)
        deadline = time.monotonic() + 60
        listening = list(ports.values())
        while listening and time.monotonic() < deadline:
            time.sleep(1)
            listening = [port for port in listening if _listens(port)]
        assert not listening, f"still served after kill -9 of team up: {listening}"
    finally:
        if process.poll() is None:
            process.kill()
        time.sleep(2)  # the servers' connections close before their databases are dropped
        for database in (f"{name}_mlflow", f"{name}_prefect"):
            team.drop_database(TEST_POSTGRES, database)


def _listens(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _worker_env(servers: TeamUp, checkout: Path) -> dict[str, str]:
    """A worker's environment: the two URLs `team env` prints, its own Prefect home, this
    tree's code; nothing else shared with the servers or the other worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env |= tracking.TELEMETRY_OFF | servers.ready()
    env["PREFECT_HOME"] = str(checkout / ".prefect-home")
    env["OMP_NUM_THREADS"] = "1"  # two workers on a 2-core machine: a core each
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return env


def _run_all(commands: list[tuple[list[str], Path, dict[str, str]]], timeout: float = 900):
    """Start every command at once, wait for all; each must succeed. Output goes to files
    (a full pipe would stall one command while the other is waited for); a command still
    running when the test fails is killed, never left behind."""
    import tempfile

    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in commands]
        processes = [
            subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
            for (cmd, cwd, env), log in zip(commands, logs, strict=True)
        ]
        try:
            deadline = time.monotonic() + timeout
            for process in processes:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        outputs = []
        for (cmd, _, _), process, log in zip(commands, processes, logs, strict=True):
            log.seek(0)
            out = log.read()
            assert process.returncode == 0, f"{cmd} failed:\n{out[-4000:]}"
            outputs.append(out)
    return outputs


@pytest.fixture(scope="module")
def workers(servers, tmp_path_factory):
    """Two worker checkouts (git + DVC, tiny parameters, data and base built once and copied)
    that fine-tuned `dpsgd` and `nonprivate` at the same time, each as a run of the
    `privtune-finetune` flow through the Prefect server, logging to the MLflow server."""
    from privtune.cli import main
    from tests.conftest import FAST_BASE, edit_params
    from tests.test_pipeline import make_project

    base = tmp_path_factory.mktemp("team-workers")
    project = make_project(base)
    edit_params(project, finetune={"audit_canaries": 32}, **FAST_BASE)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["--root", str(project), "--no-progress", "prepare"]) == 0
        assert main(["--root", str(project), "--no-progress", "base"]) == 0
    servers.ready()
    checkouts = {"dpsgd": base / "worker-a", "nonprivate": base / "worker-b"}
    for checkout in checkouts.values():
        shutil.copytree(project, checkout)
    flow = str(ROOT / "flows" / "finetune.py")
    started = time.time()
    _run_all(
        [
            ([sys.executable, flow, method], checkout, _worker_env(servers, checkout))
            for method, checkout in checkouts.items()
        ]
    )
    return checkouts, started


def _mlflow(servers: TeamUp):
    import mlflow

    return mlflow.MlflowClient(servers.env["MLFLOW_TRACKING_URI"])


def _prefect_flow_runs(servers: TeamUp) -> list[tuple[str, str]]:
    """(flow name, state) of every flow run the Prefect server recorded, through its REST API."""

    def post(path: str) -> list[dict]:
        request = urllib.request.Request(
            f"{servers.env['PREFECT_API_URL']}/{path}",
            data=b"{}",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    flows = {f["id"]: f["name"] for f in post("flows/filter")}
    return sorted((flows[r["flow_id"]], r["state_type"]) for r in post("flow_runs/filter"))


def _count(servers: TeamUp, database: str, table: str) -> int:
    """Rows of ``table`` in a server's PostgreSQL database: the data is really there."""
    connection = team._connect(servers.config.postgres, database)
    with contextlib.closing(connection), connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table}")  # noqa: S608 (a fixed table name)
        return cursor.fetchone()[0]


@pytest.mark.slow
def test_two_concurrent_finetunings_land_in_the_team_servers(servers, workers):
    checkouts, _ = workers
    client = _mlflow(servers)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"dpsgd", "nonprivate"}
    for method, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.params["method"] == method
        assert "loss" in run.data.metrics and "valid_perplexity" in run.data.metrics
        # the artifacts went through the server: none in the worker's checkout
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        assert "adapter" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert not (checkouts[method] / "mlruns").exists()
        assert not (checkouts[method] / "mlflow.db").exists()
    assert 0 < runs["dpsgd"].data.metrics["epsilon"] <= 4.0 + 1e-6
    assert "ledger.json" in {a.path for a in client.list_artifacts(runs["dpsgd"].info.run_id)}
    stored = Path(servers.config.home) / "artifacts" / experiment.experiment_id
    assert {p.name for p in stored.iterdir()} >= {r.info.run_id for r in runs.values()}
    assert _count(servers, servers.config.mlflow_database, "runs") == 2
    assert _prefect_flow_runs(servers) == [
        ("privtune-finetune", "COMPLETED"),
        ("privtune-finetune", "COMPLETED"),
    ]
    assert _count(servers, servers.config.prefect_database, "flow_run") == 2


@pytest.mark.slow
def test_both_workers_register_and_a_prefect_flow_promotes_through_the_servers(servers, workers):
    """Each worker registers its model (at the same time: one registered model, two
    versions); the promote flow, run through the Prefect server, judges both: dpsgd becomes
    champion, nonprivate is refused (ε = ∞), and each version carries its gate report."""
    from privtune import io
    from tests.test_registry import SAFE_ATTACK

    checkouts, _ = workers
    # The gates' inputs are fixed so the verdict is certain; the evaluate and attack stages
    # are tested on their own (tests/test_pipeline.py).
    for method, checkout in checkouts.items():
        attack = dict(SAFE_ATTACK, audit_epsilon_lower_bound=0.5)
        io.write_json(checkout / f"metrics/attack-{method}.json", attack)
        evaluation = {"method": method, "test_perplexity": 300.0, "medication_accuracy": 0.1}
        io.write_json(checkout / f"metrics/evaluate-{method}.json", evaluation)
    cli = [sys.executable, "-m", "privtune.cli", "--no-progress", "register"]
    _run_all(
        [
            ([*cli, method], checkout, _worker_env(servers, checkout))
            for method, checkout in checkouts.items()
        ]
    )
    client = _mlflow(servers)
    versions = {v.tags["method"]: v for v in client.search_model_versions(f"name='{MODEL}'")}
    assert set(versions) == {"dpsgd", "nonprivate"}

    promote = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from flows.promote import promote; "
        "print('DECISIONS=' + json.dumps(promote(root='.', pending=True), default=str))"
    )
    checkout = checkouts["dpsgd"]
    (out,) = _run_all(
        [([sys.executable, "-c", promote, str(ROOT)], checkout, _worker_env(servers, checkout))]
    )
    decisions = json.loads(out.split("DECISIONS=", 1)[1].splitlines()[0])
    verdicts = {d["version"]: d["promoted"] for d in decisions}
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == str(versions["dpsgd"].version)
    assert verdicts == {
        str(versions["dpsgd"].version): True,
        str(versions["nonprivate"].version): False,
    }
    for method, expected in (("dpsgd", "promoted"), ("nonprivate", "refused")):
        version = client.get_model_version(MODEL, versions[method].version)
        assert version.tags["promotion.decision"] == expected
        assert "**Promotion gates**" in version.description  # the gate report
    # the model card travelled with the model, through the server
    from privtune.registry.card import version_card

    card = version_card(client, champion, servers.env["MLFLOW_TRACKING_URI"])
    assert card["model"]["finetune_run_id"] == champion.run_id
    assert ("privtune-promote", "COMPLETED") in _prefect_flow_runs(servers)


@pytest.mark.slow
def test_a_stage_against_the_server_prints_its_result_alone_and_the_run_link_apart(
    servers, workers, tmp_path
):
    """Against a tracking server MLflow prints the run's links on stdout, which is the stage
    command's JSON result (a worker's log or a script parsing it broke: walkthrough finding);
    privtune prints where the run is on stderr instead."""
    from tests.conftest import edit_params

    checkouts, _ = workers
    checkout = tmp_path / "worker-c"
    shutil.copytree(checkouts["nonprivate"], checkout)
    edit_params(checkout, finetune={"seed": 7})  # other inputs: a new run, not the finished one
    done = subprocess.run(
        [sys.executable, "-m", "privtune.cli", "finetune", "nonprivate"],
        cwd=checkout, env=_worker_env(servers, checkout), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["method"] == "nonprivate"  # nothing else on stdout
    link = next(line for line in done.stderr.splitlines() if line.startswith("MLflow run "))
    experiment = _mlflow(servers).get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    prefix = f"MLflow run nonprivate: {servers.env['MLFLOW_TRACKING_URI']}/#/experiments/"
    assert link.startswith(f"{prefix}{experiment}/runs/")
    assert "finetune nonprivate: " in done.stderr  # the progress lines, beside it
