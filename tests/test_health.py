"""Liveness and readiness (linkedblob.health) of real servers whose dependencies fail and
recover: the gateway without a backend, blobsvc whose store cannot be written, linksvc whose
PostgreSQL is unreachable, and a graceful shutdown. deploy/probe.py answers as a kubelet's
probe would."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blobsvc.servicer import SERVICE_NAME as BLOB_SERVICE
from gateway.server import SERVICE_NAME as GATEWAY_SERVICE
from linksvc.servicer import SERVICE_NAME as LINK_SERVICE
from tests.services import spawn
from tests.stack import database, spawn_gateway

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READY_NAMES = ("", "readiness")
PROBE = str(Path(__file__).resolve().parents[1] / "deploy" / "probe.py")
# Readiness is checked every second (linkedblob.health.CHECK_INTERVAL); a backend that comes
# back is reconnected to within the channels' 2 s backoff.
FLIP_SECONDS = 10.0


def status(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(answer.status)


def wait_for(address: str, service: str, wanted: int, timeout: float = FLIP_SECONDS) -> float:
    """Seconds until ``service`` on ``address`` answers ``wanted``; fails after ``timeout``."""
    start = time.monotonic()
    while True:
        got = status(address, service)
        if got == wanted:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name
            pytest.fail(f"{address} {service!r}: {name(got)} after {timeout}s, not {name(wanted)}")
        time.sleep(0.1)


def probe(port: int, service: str) -> int:
    """deploy/probe.py's exit status, as a kubelet's exec probe sees it."""
    argv = [sys.executable, PROBE, "--port", str(port), "--service", service, "--timeout", "5"]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode


class Stack:
    def __init__(self, data: Path, db_url: str) -> None:
        self.data = data
        self.db_url = db_url
        self.blob = spawn("blob", "--data", str(data), "--log-level", "WARNING")
        self.link = spawn("link", "--db", db_url, "--migrate", "--log-level", "WARNING")
        self.gateway = spawn_gateway(self.blob.address, self.link.address)

    def restart_link(self) -> None:
        self.link = spawn(
            "link", "--db", self.db_url, "--port", str(self.link.port), "--log-level", "WARNING"
        )

    def stop(self) -> None:
        for svc in (self.gateway, self.link, self.blob):
            svc.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("health")
    with database("sqlite", directory) as url:
        s = Stack(directory / "blobs", url)
        try:
            yield s
        finally:
            s.stop()


def test_each_server_answers_liveness_readiness_and_its_services(stack: Stack) -> None:
    for svc, name in (
        (stack.blob, BLOB_SERVICE),
        (stack.link, LINK_SERVICE),
        (stack.gateway, GATEWAY_SERVICE),
    ):
        for service in ("", "readiness", "liveness", name):
            assert status(svc.address, service) == SERVING, (svc.kind, service)
        assert probe(svc.port, "liveness") == 0
        assert probe(svc.port, "readiness") == 0


def test_gateway_without_linksvc_is_alive_but_not_ready_until_it_is_back(stack: Stack) -> None:
    gateway = stack.gateway.address
    stack.link.stop()
    try:
        for service in (*READY_NAMES, GATEWAY_SERVICE):
            wait_for(gateway, service, NOT_SERVING)
        assert status(gateway, "liveness") == SERVING
        assert probe(stack.gateway.port, "readiness") == 1
        assert probe(stack.gateway.port, "liveness") == 0
        assert probe(stack.gateway.port, "") == 1
    finally:
        stack.restart_link()
    for service in (*READY_NAMES, GATEWAY_SERVICE):
        wait_for(gateway, service, SERVING)
    assert probe(stack.gateway.port, "readiness") == 0


def test_blobsvc_whose_store_cannot_be_written_is_not_ready(stack: Stack) -> None:
    """The store's directory replaced by a file: a failure root suffers too (a read-only
    mode would not stop root)."""
    data = stack.data
    away = data.with_name("blobs-away")
    data.rename(away)
    data.write_text("not a directory")
    try:
        for service in (*READY_NAMES, BLOB_SERVICE):
            wait_for(stack.blob.address, service, NOT_SERVING)
        assert status(stack.blob.address, "liveness") == SERVING
        # The gateway needs a ready blobsvc.
        wait_for(stack.gateway.address, "readiness", NOT_SERVING)
        assert status(stack.gateway.address, "liveness") == SERVING
    finally:
        data.unlink()
        away.rename(data)
    wait_for(stack.blob.address, "readiness", SERVING)
    wait_for(stack.gateway.address, "readiness", SERVING)
    assert not [p for p in (data / "tmp").iterdir() if p.name.startswith(".ready-")]


class Proxy:
    """A TCP forwarder to ``target`` on a fixed port that can be cut (every connection closed,
    new ones refused) and restored: a database that becomes unreachable."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.start()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._track(listener)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self._track(client)
            self._track(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_linksvc_whose_database_is_unreachable_is_not_ready(tmp_path: Path) -> None:
    with database("postgresql", tmp_path) as url:
        import sqlalchemy as sa

        real = sa.make_url(url)
        proxy = Proxy((real.host or "127.0.0.1", real.port or 5432))
        proxied = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        link = spawn("link", "--db", proxied, "--migrate", "--log-level", "WARNING")
        try:
            assert status(link.address, "readiness") == SERVING
            proxy.cut()
            for service in (*READY_NAMES, LINK_SERVICE):
                wait_for(link.address, service, NOT_SERVING)
            assert status(link.address, "liveness") == SERVING
            proxy.start()
            for service in (*READY_NAMES, LINK_SERVICE):
                wait_for(link.address, service, SERVING)
        finally:
            link.stop()
            proxy.cut()


def test_a_graceful_shutdown_reports_not_serving(tmp_path: Path) -> None:
    blob = spawn("blob", "--storage", "memory", "--grace", "1", "--log-level", "WARNING")
    seen: list[int] = []
    watching = threading.Event()

    def watch() -> None:
        with grpc.insecure_channel(blob.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
            stream = stub.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=20)
            try:
                for answer in stream:
                    seen.append(answer.status)
                    watching.set()
            except grpc.RpcError:
                pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert watching.wait(10)
    finally:
        assert blob.stop() == 0
    watcher.join(20)
    assert seen[0] == SERVING
    assert NOT_SERVING in seen[1:]
