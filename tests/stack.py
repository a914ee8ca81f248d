"""The whole system for end-to-end tests: blobsvc, linksvc and a gateway as real processes.

`database(kind)` makes a fresh SQLite file or PostgreSQL database for a module-scoped stack (the
`db_url` fixture of conftest.py is per test); `Stack.start` runs the three services on it.

As `linkedblob up` runs them, blobsvc and the gateway share a grant secret (in their environment)
so the gateway offers direct access to blobsvc; `direct=False` runs both without one.
"""

from __future__ import annotations

import secrets
import socket
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from linkedblob import grants
from linkedblob.config import TRANSPORT_LIMIT_BYTES, env_name
from linkedblob.v1 import registry_pb2_grpc
from tests import conftest
from tests.services import ServiceProcess, spawn

DB_KINDS = ["sqlite", "postgresql"]
GRANT_SECRET_ENV = env_name("--grant-secret")


@contextmanager
def database(kind: str, directory: Path) -> Iterator[str]:
    """A fresh database of ``kind`` ("sqlite": a file in ``directory``; "postgresql": a new
    database on $LINKEDBLOB_TEST_PG, dropped afterwards; skipped when that is not set)."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'link.db'}"
        return
    import sqlalchemy as sa

    server = conftest.pg_server_url()
    if not server:
        conftest._pg_skipped.append("pg")
        pytest.skip(f"PostgreSQL not configured ({conftest.PG_ENV} unset)")
    name = conftest.pg_database_name()
    conftest.admin_execute(server, f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        conftest.admin_execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def registry_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", TRANSPORT_LIMIT_BYTES + 1024 * 1024),
            ("grpc.max_send_message_length", TRANSPORT_LIMIT_BYTES + 1024 * 1024),
        ],
    )


@dataclass
class Stack:
    data: Path
    db_url: str
    blob: ServiceProcess
    link: ServiceProcess
    gateway: ServiceProcess
    grant_secret: str = ""  # shared by blobsvc and the gateways; "" without direct access
    extra: list[ServiceProcess] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        data: Path,
        db_url: str,
        *,
        enable_delete: bool = True,
        direct: bool = True,
        gateway_args: tuple[str, ...] = (),
    ) -> Stack:
        secret = secrets.token_urlsafe(32) if direct else ""
        # The two backends start side by side (each takes a second or so to import and bind).
        with ThreadPoolExecutor(2) as pool:
            blob_future = pool.submit(
                spawn,
                "blob",
                "--data",
                str(data / "blobs"),
                "--log-level",
                "WARNING",
                env={GRANT_SECRET_ENV: secret},
            )
            link_future = pool.submit(
                spawn, "link", "--db", db_url, "--migrate", "--log-level", "WARNING"
            )
            started = [f.result() for f in (blob_future, link_future) if f.exception() is None]
            if len(started) < 2:
                for svc in started:
                    svc.stop()
                raise (blob_future.exception() or link_future.exception())  # type: ignore[misc]
        blob, link = started
        try:
            gateway = spawn_gateway(
                blob.address,
                link.address,
                enable_delete=enable_delete,
                grant_secret=secret,
                args=gateway_args,
            )
        except BaseException:
            link.stop()
            blob.stop()
            raise
        return cls(data, db_url, blob, link, gateway, secret)

    @property
    def address(self) -> str:
        return self.gateway.address

    def another_gateway(self, *, enable_delete: bool, args: tuple[str, ...] = ()) -> ServiceProcess:
        """A second gateway on the same backends (stopped with the stack)."""
        gateway = spawn_gateway(
            self.blob.address,
            self.link.address,
            enable_delete=enable_delete,
            grant_secret=self.grant_secret,
            args=args,
        )
        self.extra.append(gateway)
        return gateway

    def blob_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Call metadata for a test talking to blobsvc itself: an internal grant, as the
        gateway sends (None when the stack has no secret)."""
        if not self.grant_secret:
            return None
        token = grants.Signer(self.grant_secret).sign(grants.INTERNAL)
        return ((grants.METADATA_KEY, token),)

    def stop(self) -> None:
        for svc in (*self.extra, self.gateway, self.link, self.blob):
            svc.stop()


def spawn_gateway(
    blob_addr: str,
    link_addr: str,
    *,
    enable_delete: bool = True,
    port: int = 0,
    grant_secret: str = "",
    args: tuple[str, ...] = (),
) -> ServiceProcess:
    argv = ["--blob-addr", blob_addr, "--link-addr", link_addr, "--port", str(port), *args]
    if enable_delete:
        argv.append("--enable-delete")
    return spawn("gateway", *argv, "--log-level", "WARNING", env={GRANT_SECRET_ENV: grant_secret})


@contextmanager
def running_stack(
    kind: str,
    directory: Path,
    *,
    enable_delete: bool = True,
    direct: bool = True,
    gateway_args: tuple[str, ...] = (),
) -> Iterator[Stack]:
    with database(kind, directory) as url:
        stack = Stack.start(
            directory, url, enable_delete=enable_delete, direct=direct, gateway_args=gateway_args
        )
        try:
            yield stack
        finally:
            stack.stop()


def free_port() -> int:
    """A port nobody listens on right now (for a server flag that cannot take 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """A server's Prometheus metrics: sample line (name with labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def registry(address: str) -> registry_pb2_grpc.RegistryStub:
    return registry_pb2_grpc.RegistryStub(registry_channel(address))


class Raised:
    """What :func:`rpc_error` caught: the code, the ErrorInfo reason and metadata."""

    code: grpc.StatusCode | None = None
    reason: str = ""
    metadata: dict[str, str]
    details: str = ""


@contextmanager
def rpc_error(code: grpc.StatusCode, reason: str) -> Iterator[Raised]:
    """Asserts that the block fails with ``code`` and an ErrorInfo ``reason``."""
    from linkedblob.errors import error_info

    raised = Raised()
    raised.metadata = {}
    with pytest.raises(grpc.RpcError) as exc_info:
        yield raised
    err = exc_info.value
    info = error_info(err)
    raised.code = err.code()  # type: ignore[attr-defined]
    raised.details = err.details() or ""  # type: ignore[attr-defined]
    raised.reason = info.reason if info is not None else ""
    raised.metadata = dict(info.metadata) if info is not None else {}
    assert (raised.code, raised.reason) == (code, reason), raised.details
