"""The gateway relays in bounded memory: blobs far larger than what it may hold pass through it
both ways, and concurrent relayed pushes do not each cost it a blob's worth (or a large HTTP/2
window's worth). Clients with direct=False, so that every byte crosses the gateway."""

from __future__ import annotations

import io
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from linkedblob.client import Client
from linkedblob.config import MiB
from tests.stack import Stack, running_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack("sqlite", tmp_path_factory.mktemp("memory")) as s:
        yield s


@pytest.fixture
def repo() -> str:
    return f"memory/{secrets.token_hex(5)}"


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS


def test_the_gateway_relays_a_big_blob_in_bounded_memory(
    stack: Stack, repo: str, tmp_path: Path
) -> None:
    """A blob much larger than the gateway's memory growth limit passes through it both ways."""
    size = 160 * MiB
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
    with Client(stack.address, direct=False) as client:
        warm = client.push(repo, os.urandom(16 * MiB))  # steady-state buffers first
        client.pull(repo, warm.digest, io.BytesIO())
        before = stack.gateway.peak_rss()
        desc = client.push(repo, path)
        client.pull(repo, desc.digest, tmp_path / "out.bin")
    growth = stack.gateway.peak_rss() - before
    assert growth < 64 * MiB, f"gateway peak RSS grew {growth / MiB:.0f} MiB for a 160 MiB blob"
    assert (tmp_path / "out.bin").stat().st_size == size


def test_concurrent_relayed_pushes_in_bounded_memory(stack: Stack, repo: str) -> None:
    """8 pushes of 32 MiB at once: 256 MiB in flight, of which the gateway holds a few
    messages per stream, thanks to its fixed HTTP/2 windows (measured: bench/README.md)."""
    n, size = 8, 32 * MiB
    payload = os.urandom(size)
    clients = [Client(stack.address, direct=False, timeout=120) for _ in range(n)]
    try:
        for client in clients:
            client.push(f"{repo}-warm", os.urandom(2 * MiB))  # connected, buffers warm
        reset_peak(stack.gateway.proc.pid)
        before = stack.gateway.peak_rss()
        start = threading.Barrier(n)
        failures: list[BaseException] = []

        def push(client: Client, i: int) -> None:
            start.wait()
            try:
                blob = i.to_bytes(4, "big") + payload[4:]
                client.push(f"{repo}-{i}", blob)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=push, args=(c, i)) for i, c in enumerate(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures
    finally:
        for client in clients:
            client.close()
    growth = stack.gateway.peak_rss() - before
    assert growth < 80 * MiB, f"gateway peak RSS grew {growth / MiB:.0f} MiB for 8 x 32 MiB"
