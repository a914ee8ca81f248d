"""linkedblob under test: the ``up`` configuration (filesystem + SQLite) and a PostgreSQL one.

``up`` is run exactly as a user would run it (``linkedblob up --data DIR --port 0 ...``); the
PostgreSQL variant runs ``linkedblob serve blob|link|gateway`` itself, against a database it
creates for the run and drops afterwards, with a grant secret shared by blobsvc and the gateway
as ``up`` gives them (so both variants offer the client direct access to blobsvc). Services log
at WARNING (the registry logs at warn with its access log off): both sides measure the data
path, not their logging; ``--telemetry`` runs them as in production instead (access log at INFO
in JSON, a metrics port each) to measure what that costs.
"""

from __future__ import annotations

import re
import secrets
import sys
from pathlib import Path

import psutil

from bench.lbclient import LinkedblobClient, client_note
from bench.procs import Process
from linkedblob.up import GRANT_SECRET_ENV

QUIET = {"LINKEDBLOB_LOG_LEVEL": "WARNING", "LINKEDBLOB_LOG_FORMAT": "text"}
# `--telemetry`: what an operator runs in production instead, the access log (one JSON line per
# call) and a Prometheus endpoint on every service, to measure what they cost.
TELEMETRY = {
    "LINKEDBLOB_LOG_LEVEL": "INFO",
    "LINKEDBLOB_LOG_FORMAT": "json",
    "LINKEDBLOB_METRICS_PORT": "0",
}
SERVICE_ENV = dict(QUIET)


def with_telemetry() -> None:
    """Every service started from now on logs each call and serves metrics."""
    SERVICE_ENV.clear()
    SERVICE_ENV.update(TELEMETRY)


UP_READY = re.compile(r"^linkedblob is up: gateway (\S+) \(blobsvc ([^,\s]+), linksvc ([^,\s)]+)")
SERVICE_NAMES = {"gateway": "gateway", "blob": "blobsvc", "link": "linksvc"}
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "linkedblob.cli", *args]


class LinkedblobUp:
    """``linkedblob up`` on a fresh data directory, all ports picked by the system."""

    name = "linkedblob"

    @property
    def client_note(self) -> str:
        return client_note()

    def __init__(self, workdir: Path) -> None:
        data = str(workdir / "data")
        ports = ["--port", "0", "--blob-port", "0", "--link-port", "0"]
        argv = _cli("up", "--data", data, *ports)
        self.process = Process("linkedblob up", argv, workdir / "up.log", env=dict(SERVICE_ENV))
        try:
            match = self.process.wait_ready(UP_READY)
            self.address = match.group(1)
            self._services = self._children()
        except BaseException:
            self.process.stop()
            raise

    def _children(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for child in psutil.Process(self.process.pid).children():
            argv = child.cmdline()
            if "serve" in argv:
                kind = argv[argv.index("serve") + 1]
                if kind in SERVICE_NAMES:  # not the garbage collector: it is not measured
                    found[SERVICE_NAMES[kind]] = child.pid
        if set(found) != set(SERVICE_NAMES.values()):
            raise RuntimeError(f"linkedblob up: expected three services, found {found}")
        return {name: found[name] for name in SERVICE_NAMES.values()}

    def services(self) -> dict[str, int]:
        return dict(self._services)

    def client(self) -> LinkedblobClient:
        return LinkedblobClient(self.address)

    def stop(self) -> None:
        self.process.stop(timeout=90)


class LinkedblobPostgres:
    """The three services run one by one, linksvc on a PostgreSQL database made for the run."""

    name = "linkedblob/pg"

    @property
    def client_note(self) -> str:
        return client_note()

    def __init__(self, workdir: Path, server_url: str) -> None:
        import sqlalchemy as sa

        self.server_url = server_url
        self.database = f"linkedblob_bench_{secrets.token_hex(6)}"
        admin_execute(server_url, f'CREATE DATABASE "{self.database}"')
        db_url = sa.make_url(server_url).set(database=self.database)
        self.processes: list[Process] = []
        granting = {GRANT_SECRET_ENV: secrets.token_urlsafe(32)}
        try:
            blob = self._serve(workdir, "blob", "--data", str(workdir / "blobs"), env=granting)
            link = self._serve(
                workdir, "link", "--db", db_url.render_as_string(hide_password=False), "--migrate"
            )
            self.address = self._serve(
                workdir, "gateway", "--blob-addr", blob, "--link-addr", link, env=granting
            )
        except BaseException:
            self.stop()
            raise

    def _serve(
        self, workdir: Path, kind: str, *args: str, env: dict[str, str] | None = None
    ) -> str:
        argv = _cli("serve", kind, "--host", "127.0.0.1", "--port", "0", "--open", *args)
        process = Process(
            f"linkedblob {kind}", argv, workdir / f"{kind}.log", env={**SERVICE_ENV, **(env or {})}
        )
        self.processes.append(process)
        ready = re.compile(rf"^linkedblob {kind} listening on (\S+)$")
        return process.wait_ready(ready).group(1)

    def services(self) -> dict[str, int]:
        kinds = ("blob", "link", "gateway")
        pids = {SERVICE_NAMES[k]: p.pid for k, p in zip(kinds, self.processes, strict=True)}
        return {name: pids[name] for name in SERVICE_NAMES.values()}

    def client(self) -> LinkedblobClient:
        return LinkedblobClient(self.address)

    def stop(self) -> None:
        try:
            for process in reversed(self.processes):
                process.stop(timeout=60)
        finally:
            admin_execute(
                self.server_url, f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'
            )


def postgres_reachable(server_url: str) -> str | None:
    """None when the server answers, else why not."""
    try:
        admin_execute(server_url, "SELECT 1")
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def admin_execute(server_url: str, sql: str) -> None:
    """Runs one statement outside a transaction (CREATE / DROP DATABASE); the tests use it too."""
    import sqlalchemy as sa

    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(sql)
    finally:
        engine.dispose()
