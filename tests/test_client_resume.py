"""A resumable push survives a broken connection: the gateway process (or, on the direct path,
blobsvc) is killed in the middle of the push and started again on the same port; the client
backs off, reads the upload's offset from GetUpload, seeks its file there and finishes. The
pulled bytes match.

Each test runs with direct access to blobsvc offered (as `linkedblob up` runs) and without it
(every byte through the gateway)."""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from linkedblob.client import Client, ClientError
from linkedblob.config import MiB
from tests.services import ServiceProcess, spawn
from tests.stack import GRANT_SECRET_ENV, Stack, running_stack, spawn_gateway


@pytest.fixture(params=["relay", "direct"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    with running_stack("sqlite", tmp_path, direct=request.param == "direct") as s:
        yield s


class GatewayKiller:
    """A progress callback that kills the gateway once ``after`` bytes were sent, and starts a
    new one on the same port in the background."""

    def __init__(self, stack: Stack, after: int) -> None:
        self.stack = stack
        self.after = after
        self.sent = 0
        self.killed_at: int | None = None
        self.increments: list[int] = []
        self.restarted = threading.Event()
        self.new_gateway: ServiceProcess | None = None

    def __call__(self, n: int) -> None:
        self.increments.append(n)
        self.sent += n
        if self.killed_at is None and self.sent >= self.after:
            self.killed_at = self.sent
            old = self.stack.gateway
            old.proc.send_signal(signal.SIGKILL)
            old.proc.wait()
            threading.Thread(target=self._restart, args=(old.port,), daemon=True).start()

    def _restart(self, port: int) -> None:
        self.new_gateway = spawn_gateway(
            self.stack.blob.address,
            self.stack.link.address,
            port=port,
            grant_secret=self.stack.grant_secret,
        )
        self.stack.gateway = self.new_gateway  # stopped with the stack
        self.restarted.set()


def test_resumable_push_survives_a_gateway_restart(stack: Stack, tmp_path: Path) -> None:
    data = os.urandom(24 * MiB + 3)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    repo = f"resume/{secrets.token_hex(4)}"
    killer = GatewayKiller(stack, after=6 * MiB)
    with Client(stack.address, retry_timeout=60) as client:
        desc = client.push(repo, path, resumable=True, progress=killer)
        assert killer.killed_at is not None and killer.killed_at < len(data)
        assert killer.restarted.is_set()
        assert desc.digest == f"sha256:{hashlib.sha256(data).hexdigest()}"
        assert desc.size == len(data)
        # The progress shown went back to the resumed offset and still adds up.
        assert sum(killer.increments) == len(data)
        out = tmp_path / "pulled.bin"
        client.pull(repo, desc.digest, out)
        assert out.read_bytes() == data


def test_a_plain_push_fails_cleanly_when_the_gateway_goes(stack: Stack, tmp_path: Path) -> None:
    data = os.urandom(16 * MiB)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    repo = f"resume/{secrets.token_hex(4)}"
    killer = GatewayKiller(stack, after=4 * MiB)
    with Client(stack.address) as client:
        if stack.grant_secret:
            # The bytes go to blobsvc: a gateway gone meanwhile only delays the commit.
            assert client.push(repo, iter([data]), progress=killer).digest == digest
            assert killer.killed_at is not None and killer.restarted.is_set()
            assert client.get(repo, digest) == data
            return
        with pytest.raises(ClientError) as err:
            client.push(repo, iter([data]), progress=killer)
        assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert killer.restarted.wait(30)
        # Nothing was linked; the restarted gateway takes the push from the start.
        assert not client.exists(repo, digest)
        assert client.push(repo, data).size == len(data)


class BlobsvcKiller:
    """A progress callback that kills blobsvc once ``after`` bytes were sent, and starts it
    again on the same port, data directory and secret once ``restart`` is set."""

    def __init__(self, stack: Stack, after: int) -> None:
        self.stack = stack
        self.after = after
        self.sent = 0
        self.killed_at: int | None = None
        self.restarted = threading.Event()

    def __call__(self, n: int) -> None:
        self.sent += n
        if self.killed_at is None and self.sent >= self.after:
            self.killed_at = self.sent
            old = self.stack.blob
            old.proc.send_signal(signal.SIGKILL)
            old.proc.wait()
            threading.Thread(target=self._restart, args=(old.port,), daemon=True).start()

    def _restart(self, port: int) -> None:
        self.stack.blob = spawn(
            "blob",
            "--data",
            str(self.stack.data / "blobs"),
            "--log-level",
            "WARNING",
            "--port",
            str(port),
            env={GRANT_SECRET_ENV: self.stack.grant_secret},
        )
        self.restarted.set()


def test_resumable_push_survives_a_blobsvc_restart(stack: Stack, tmp_path: Path) -> None:
    data = os.urandom(24 * MiB + 5)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    repo = f"resume/{secrets.token_hex(4)}"
    killer = BlobsvcKiller(stack, after=6 * MiB)
    with Client(stack.address, retry_timeout=60) as client:
        desc = client.push(repo, path, resumable=True, progress=killer)
        assert killer.killed_at is not None and killer.restarted.is_set()
        assert desc.digest == f"sha256:{hashlib.sha256(data).hexdigest()}"
        assert client.get(repo, desc.digest) == data
