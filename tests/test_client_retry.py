"""The client library makes idempotent calls again when the gateway is unavailable: a put, and
a push that declares its digest (content addressing makes both harmless to repeat); a push
without a digest is not made again. Against a gateway whose port starts listening late, and
one restarted while a client works."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from linkedblob.client import Client, ClientError
from tests.services import ServiceProcess
from tests.stack import Stack, free_port, spawn_gateway

CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("retry")
    stack = Stack.start(data, f"sqlite:///{data / 'link.db'}", direct=False)
    try:
        yield stack
    finally:
        stack.stop()


def _gateway_on(stack: Stack, port: int) -> ServiceProcess:
    gateway = spawn_gateway(stack.blob.address, stack.link.address, port=port)
    stack.extra.append(gateway)
    return gateway


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _late(stack: Stack, port: int, delay: float) -> threading.Thread:
    """Starts a gateway on ``port`` after ``delay`` seconds (in a thread)."""

    def start() -> None:
        time.sleep(delay)
        _gateway_on(stack, port)

    thread = threading.Thread(target=start)
    thread.start()
    return thread


def test_put_and_push_by_digest_wait_for_a_gateway_that_listens_late(
    backends: Stack, tmp_path: Path
) -> None:
    port = free_port()
    small = b"put while the gateway starts"
    big = bytes(range(256)) * 1024  # 256 KiB: more than a chunk, so PushBlob streams it
    with Client(f"127.0.0.1:{port}", retry_timeout=60, chunk_size=CHUNK) as client:
        starter = _late(backends, port, 1.5)
        try:
            with ThreadPoolExecutor(2) as pool:
                put: Future[object] = pool.submit(client.put, "retry/late", small)
                push: Future[object] = pool.submit(
                    client.push, "retry/late", big, digest=_digest(big)
                )
                assert put.result(timeout=90).digest == _digest(small)  # type: ignore[attr-defined]
                assert push.result(timeout=90).digest == _digest(big)  # type: ignore[attr-defined]
        finally:
            starter.join()  # its gateway is stopped with the backends, not left running
        assert client.get("retry/late", _digest(big)) == big


def test_a_push_without_digest_is_not_made_again(backends: Stack) -> None:
    port = free_port()  # nobody listens
    big = b"z" * (4 * CHUNK)
    with Client(f"127.0.0.1:{port}", retry_timeout=60, chunk_size=CHUNK) as client:
        started = time.monotonic()
        with pytest.raises(ClientError) as caught:
            client.push("retry/none", big)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        # Not retried for the 60 s budget (a generous bound; no speed is asserted).
        assert time.monotonic() - started < 30


def test_puts_go_on_through_a_gateway_restart(backends: Stack) -> None:
    port = free_port()
    gateway = _gateway_on(backends, port)
    stored: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def work() -> None:
        with Client(f"127.0.0.1:{port}", retry_timeout=60, chunk_size=CHUNK) as client:
            n = 0
            while not stop.is_set():
                data = f"restart {n}".encode()
                try:
                    stored.append(client.put("retry/restart", data).digest)
                    big = data * 20_000  # pushed as a stream, by digest
                    stored.append(client.push("retry/restart", big, digest=_digest(big)).digest)
                except BaseException as exc:
                    errors.append(exc)
                    return
                n += 1

    worker = threading.Thread(target=work)
    worker.start()
    time.sleep(1.0)
    gateway.stop()
    time.sleep(1.0)
    _gateway_on(backends, port)
    time.sleep(1.5)
    stop.set()
    worker.join(timeout=120)
    assert not errors, errors
    assert len(stored) >= 4
