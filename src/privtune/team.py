"""A team deployment: one MLflow tracking server and one Prefect server, both on PostgreSQL.

Why: the embedded default (sqlite `mlflow.db` in the project, Prefect's ephemeral sqlite
server; what `make demo` uses) lives on one disk and serialises writers, so workers on several
machines cannot share it. Here both stores are PostgreSQL databases, MLflow serves (proxies)
the artifacts itself, so a worker needs no shared filesystem, only two URLs:

    python -m privtune.team up --postgres postgresql://USER@HOST:5432     # or: make team-servers
    python -m privtune.team env --host mlflow.internal                    # a worker's exports

We run the servers' own CLIs (`mlflow server`, `prefect server start`): nothing here is a
server, only the wiring (databases, ports, health, environment, shutdown). Backups are the
database's (`pg_dump`) plus the artifacts directory.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privtune.errors import ConfigError, ServerError
from privtune.lifetime import stop_with_parent
from privtune.tracking import TELEMETRY_OFF, driver_line, login_refused, redact

POSTGRES_ENV = "PRIVTUNE_POSTGRES_URL"
# Trust/peer authentication as the current OS user on this machine; set a password in the URL
# (or ~/.pgpass) for a real server.
DEFAULT_POSTGRES = "postgresql://127.0.0.1:5432/postgres"
POSTGRES_FIELD = f"--postgres (or ${POSTGRES_ENV})"
MLFLOW_ENV = "MLFLOW_TRACKING_URI"
PREFECT_ENV = "PREFECT_API_URL"
BIN = Path(sys.executable).parent


@dataclass
class TeamConfig:
    """Where the servers store their data and listen. ``postgres`` names the PostgreSQL
    server (its database, `postgres` by default, is only used to create the two below)."""

    postgres: str = DEFAULT_POSTGRES
    mlflow_database: str = "privtune_mlflow"
    prefect_database: str = "privtune_prefect"
    host: str = "127.0.0.1"  # the interface to bind; 0.0.0.0 for workers on other machines
    public_host: str | None = None  # what workers connect to (default: host, or this machine)
    mlflow_port: int = 5000
    prefect_port: int = 4200
    home: Path = field(default_factory=lambda: Path(".privtune/team"))
    artifacts: str | None = None  # default <home>/artifacts; s3://... etc. work too
    mlflow_workers: int = 2
    allowed_hosts: str | None = None  # MLflow's DNS-rebinding guard: add the public name
    startup_timeout: float = 240.0


def _url(value: str) -> Any:
    """The PostgreSQL URL as SQLAlchemy parses it; anything else is an error naming the
    setting (a typo here would otherwise surface as a server that never starts)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
    except ArgumentError:
        url = None
    if url is None or url.get_backend_name() != "postgresql" or not url.host:
        raise ConfigError(
            POSTGRES_FIELD,
            f"{redact(value)!r} is not a PostgreSQL URL",
            "use postgresql://USER[:PASSWORD]@HOST[:PORT][/DATABASE], "
            "e.g. postgresql://root@127.0.0.1:5432",
        )
    return url


def database_url(postgres: str, database: str, driver: str | None = None) -> str:
    """``postgres`` pointed at ``database`` (and a driver: asyncpg for Prefect, psycopg2, the
    default, for MLflow), password kept: it goes into a server's environment, never argv."""
    url = _url(postgres)
    name = f"postgresql+{driver}" if driver else "postgresql"
    return url.set(drivername=name, database=database).render_as_string(hide_password=False)


def mlflow_store_uri(config: TeamConfig) -> str:
    return database_url(config.postgres, config.mlflow_database)


def prefect_database_url(config: TeamConfig) -> str:
    return database_url(config.postgres, config.prefect_database, "asyncpg")


def client_env(config: TeamConfig) -> dict[str, str]:
    """What a worker (or a laptop) exports to log to and schedule through this deployment."""
    host = config.public_host or (
        socket.getfqdn() if config.host in ("0.0.0.0", "::") else config.host
    )
    return {
        MLFLOW_ENV: f"http://{host}:{config.mlflow_port}",
        PREFECT_ENV: f"http://{host}:{config.prefect_port}/api",
    }


def _connect(postgres: str, database: str | None = None, timeout: int = 5) -> Any:
    """A psycopg2 connection (autocommit: CREATE DATABASE cannot run in a transaction); an
    unreachable server or a refused login names the setting and the fix."""
    import psycopg2

    url = _url(postgres)
    try:
        connection = psycopg2.connect(
            host=url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            dbname=database or url.database or "postgres",
            connect_timeout=timeout,
        )
    except psycopg2.OperationalError as err:
        first = driver_line(err)
        if login_refused(first):  # a retry will not change it: exit 2, not 6
            raise ConfigError(
                POSTGRES_FIELD,
                f"PostgreSQL at {redact(postgres)} refused the login ({first})",
                "check the user, password and database in the setting (postgresql://USER"
                "[:PASSWORD]@HOST:PORT[/DATABASE], postgres when none is named): the role must "
                "exist and may log in, the database must exist",
            ) from None
        raise ServerError(
            POSTGRES_FIELD,
            f"PostgreSQL at {redact(postgres)} is not reachable ({first})",
            f"start PostgreSQL (check: pg_isready -h {url.host} -p {url.port or 5432}), or "
            "point the setting at a reachable server: postgresql://USER[:PASSWORD]@HOST:PORT",
        ) from None
    connection.autocommit = True
    return connection


def check_postgres(postgres: str, timeout: int = 5) -> None:
    """Raise ServerError (naming the setting) unless PostgreSQL answers, ConfigError when it
    refuses the login."""
    _connect(postgres, timeout=timeout).close()


def ensure_database(postgres: str, name: str) -> bool:
    """Create database ``name`` unless it exists; True when created."""
    import psycopg2
    from psycopg2 import sql

    with contextlib.closing(_connect(postgres)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cursor.fetchone():
            return False
        try:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg2.errors.InsufficientPrivilege:  # a grant, not an outage: exit 2
            raise ConfigError(
                POSTGRES_FIELD,
                f"user {_url(postgres).username or '(OS user)'} may not create database {name}",
                f"create it once as an administrator (createdb {name}) or grant CREATEDB",
            ) from None
    return True


def drop_database(postgres: str, name: str) -> None:
    """Drop database ``name`` (tests; its servers must be stopped, or they are cut off)."""
    from psycopg2 import sql

    with contextlib.closing(_connect(postgres)) as connection, connection.cursor() as cursor:
        statement = "DROP DATABASE IF EXISTS {} WITH (FORCE)"
        cursor.execute(sql.SQL(statement).format(sql.Identifier(name)))


def _check_port(host: str, port: int, setting: str) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ConfigError(
                setting,
                f"cannot listen on {host}:{port} ({err.strerror})",
                f"stop what uses port {port}, or choose another with {setting}",
            ) from None


def healthy(url: str, timeout: float = 3.0) -> bool:
    """True when GET ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


class TeamServers:
    """Both servers as child processes: start (databases created if missing), wait until
    healthy, stop on exit. A context manager, so a test or `up` never leaves one running."""

    def __init__(self, config: TeamConfig) -> None:
        self.config = config
        self.home = Path(config.home).resolve()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def env(self) -> dict[str, str]:
        return client_env(self.config)

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ) | TELEMETRY_OFF
        env.pop(MLFLOW_ENV, None)  # the server's own store is the one given below
        env.pop(PREFECT_ENV, None)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str]) -> None:
        log = (self.home / f"{name}.log").open("ab")
        try:
            self.processes[name] = subprocess.Popen(
                argv, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=stop_with_parent,  # a `kill -9` of `team up` stops them too
            )  # fmt: skip
        finally:
            log.close()

    def launch(self) -> None:
        """Check the ports and PostgreSQL, create the databases, start both servers (without
        waiting for them: a caller may prepare its work meanwhile, then wait_healthy())."""
        config = self.config
        _check_port(config.host, config.mlflow_port, "--mlflow-port")
        _check_port(config.host, config.prefect_port, "--prefect-port")
        check_postgres(config.postgres)
        for database in (config.mlflow_database, config.prefect_database):
            ensure_database(config.postgres, database)
        self.home.mkdir(parents=True, exist_ok=True)
        artifacts = config.artifacts or str(self.home / "artifacts")

        mlflow_env = self._base_env() | {
            # in the environment, not argv: `ps` would show a password
            "MLFLOW_BACKEND_STORE_URI": mlflow_store_uri(config),
            # privtune uses no server-side jobs (GenAI judges): no job runner (8 processes)
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get(
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"
            ),
        }
        mlflow_argv = [
            str(BIN / "mlflow"), "server", "--host", config.host,
            "--port", str(config.mlflow_port), "--workers", str(config.mlflow_workers),
            "--serve-artifacts", "--artifacts-destination", artifacts,
        ]  # fmt: skip
        if config.allowed_hosts:
            mlflow_argv += ["--allowed-hosts", config.allowed_hosts]
        prefect_env = self._base_env() | {
            "PREFECT_API_DATABASE_CONNECTION_URL": prefect_database_url(config),
            "PREFECT_HOME": str(self.home / "prefect-home"),
        }
        prefect_argv = [
            str(BIN / "prefect"), "server", "start", "--host", config.host,
            "--port", str(config.prefect_port), "--analytics-off",
        ]  # fmt: skip
        try:
            self._spawn("mlflow", mlflow_argv, mlflow_env)
            self._spawn("prefect", prefect_argv, prefect_env)
        except BaseException:
            self.stop()
            raise

    def start(self) -> dict[str, str]:
        """launch() and wait until both answer their health checks (stopped again if one
        does not). Returns the workers' environment."""
        self.launch()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self.env

    def _health_urls(self) -> dict[str, str]:
        local = "127.0.0.1" if self.config.host in ("0.0.0.0", "::") else self.config.host
        return {
            "mlflow": f"http://{local}:{self.config.mlflow_port}/health",
            "prefect": f"http://{local}:{self.config.prefect_port}/api/health",
        }

    def wait_healthy(self) -> None:
        """Until both answer; a server that exits or stays silent is an error quoting its log."""
        waiting = self._health_urls()
        deadline = time.monotonic() + self.config.startup_timeout
        while waiting:
            for name, url in list(waiting.items()):
                process = self.processes[name]
                if process.poll() is not None:
                    raise ServerError(
                        f"{name} server",
                        f"exited with code {process.returncode} while starting: "
                        f"{self._log_tail(name)}",
                        f"read {self.home / (name + '.log')}",
                    )
                if healthy(url):
                    del waiting[name]
            if waiting and time.monotonic() > deadline:
                names = ", ".join(waiting)
                raise ServerError(
                    f"{names} server",
                    f"not healthy after {self.config.startup_timeout:.0f} s",
                    f"read the logs in {self.home}",
                )
            if waiting:
                time.sleep(0.5)

    def _log_tail(self, name: str, lines: int = 5) -> str:
        path = self.home / f"{name}.log"
        text = path.read_text(errors="replace") if path.is_file() else ""
        return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to each server's process group (its uvicorn workers too), SIGKILL after
        ``timeout``."""
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=timeout)
            with contextlib.suppress(ProcessLookupError):  # workers left in the group
                os.killpg(process.pid, signal.SIGKILL)

    def __enter__(self) -> TeamServers:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running(config: TeamConfig) -> Iterator[TeamServers]:
    """Both servers for the duration of the block."""
    with TeamServers(config) as servers:
        yield servers


def exports(env: Mapping[str, str]) -> str:
    return "\n".join(f"export {key}={value}" for key, value in env.items())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m privtune.team", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("up", "env"):
        cmd = sub.add_parser(
            command,
            help="start both servers (foreground; Ctrl-C stops them)"
            if command == "up"
            else "print the environment a worker exports",
        )
        cmd.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: all)")
        cmd.add_argument("--public-host", help="the name workers use (default: --host)")
        cmd.add_argument("--mlflow-port", type=_port, default=5000)
        cmd.add_argument("--prefect-port", type=_port, default=4200)
    up = sub.choices["up"]
    up.add_argument(
        "--postgres",
        default=os.environ.get(POSTGRES_ENV, DEFAULT_POSTGRES),
        help=f"PostgreSQL server URL (default: ${POSTGRES_ENV} or {DEFAULT_POSTGRES})",
    )
    up.add_argument("--mlflow-database", default="privtune_mlflow")
    up.add_argument("--prefect-database", default="privtune_prefect")
    up.add_argument("--home", default=".privtune/team", help="logs, Prefect home, artifacts")
    up.add_argument("--artifacts", help="artifact store (default: <home>/artifacts; s3://...)")
    up.add_argument("--mlflow-workers", type=_positive(int), default=2)
    up.add_argument(
        "--startup-timeout",
        type=_positive(float),
        default=240.0,
        help="seconds to wait for both servers",
    )
    up.add_argument("--allowed-hosts", help="MLflow --allowed-hosts (add the public name)")
    return parser


def _port(text: str) -> int:
    """A TCP port a server can listen on (0 would let the OS choose one no worker knows)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 1 to 65535")
    return port


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a {kind.__name__}") from None
        if not 0 < value < math.inf:  # nan too
            raise argparse.ArgumentTypeError(f"{text} must be a number above 0")
        return value

    return parse


def _config(args: argparse.Namespace) -> TeamConfig:
    if args.mlflow_port == args.prefect_port:
        raise ConfigError(
            "--prefect-port",
            f"the same port as --mlflow-port ({args.mlflow_port}): two servers cannot share it",
            "give each server its own port (defaults: MLflow 5000, Prefect 4200)",
        )
    config = TeamConfig(
        host=args.host,
        public_host=args.public_host,
        mlflow_port=args.mlflow_port,
        prefect_port=args.prefect_port,
    )
    if args.command == "up":
        config.postgres = args.postgres
        config.mlflow_database = args.mlflow_database
        config.prefect_database = args.prefect_database
        config.home, config.artifacts = Path(args.home), args.artifacts
        config.mlflow_workers, config.allowed_hosts = args.mlflow_workers, args.allowed_hosts
        config.startup_timeout = args.startup_timeout
    return config


def main(argv: list[str] | None = None) -> int:
    from privtune.errors import PrivtuneError

    args = _parser().parse_args(argv)
    try:
        config = _config(args)
    except PrivtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "env":
        print(exports(client_env(config)))
        return 0

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM (a service manager) stops the servers as Ctrl-C does

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with running(config) as servers:
            print(f"MLflow:  {servers.env[MLFLOW_ENV]}  (store {redact(mlflow_store_uri(config))})")
            print(f"Prefect: {servers.env[PREFECT_ENV]}  (database {config.prefect_database})")
            print(f"Logs:    {servers.home}\n\nOn each worker:\n{exports(servers.env)}", flush=True)
            while True:
                for name, process in servers.processes.items():
                    if process.poll() is not None:
                        print(f"{name} server exited ({process.returncode}): see its log")
                        return 6
                time.sleep(1)
    except PrivtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 6 if isinstance(err, ServerError) else 2
    except KeyboardInterrupt:
        print("servers stopped", file=sys.stderr)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
