"""The client's direct path, seen from the gateway's metrics: with direct access offered, a
pull's and a push's bytes go straight to blobsvc (the gateway answers LocateBlob, StartUpload
and CommitUpload and relays nothing); when blobsvc cannot be reached from the client, or the
gateway offers no direct access, the same calls go through the gateway, and the client stops
asking for a while. An expired grant is renewed through GetUpload."""

from __future__ import annotations

import gc
import hashlib
import io
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from linkedblob.client import Client
from linkedblob.config import MiB
from tests.services import ServiceProcess
from tests.stack import Stack, free_port, running_stack, scrape

Code = grpc.StatusCode


class Metered:
    """A gateway and its metrics port."""

    def __init__(self, gateway: ServiceProcess, metrics_port: int) -> None:
        self.address = gateway.address
        self.metrics_port = metrics_port

    def count(self, sample: str) -> float:
        return scrape(self.metrics_port).get(sample, 0.0)

    def calls(self, method: str, code: str = "OK") -> float:
        return self.count(
            f'grpc_server_handled_total{{grpc_code="{code}",grpc_method="{method}",'
            'grpc_service="linkedblob.v1.Registry",grpc_type="unary"}'
        )

    def relayed(self) -> float:
        """Blob bytes the gateway received or sent on its byte streams."""
        samples = scrape(self.metrics_port)
        return sum(
            value
            for name, value in samples.items()
            if name.startswith(("linkedblob_bytes_received_total", "linkedblob_bytes_sent_total"))
            and ("PushBlob" in name or "WriteUpload" in name or "ReadBlob" in name)
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack("sqlite", tmp_path_factory.mktemp("client-direct")) as s:
        yield s


def metered(stack: Stack, *args: str) -> Metered:
    port = free_port()
    gateway = stack.another_gateway(enable_delete=True, args=("--metrics-port", str(port), *args))
    return Metered(gateway, port)


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Metered:
    return metered(stack)


@pytest.fixture
def repo() -> str:
    return f"client-direct/{secrets.token_hex(5)}"


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def test_bytes_go_straight_to_blobsvc(gateway: Metered, repo: str, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 1)
    path = tmp_path / "in.bin"
    path.write_bytes(data)
    locates, commits = gateway.calls("LocateBlob"), gateway.calls("CommitUpload")
    with Client(gateway.address) as client:
        desc = client.push(repo, path, media_type="a/b")
        assert desc.digest == digest_of(data)
        client.pull(repo, desc.digest, tmp_path / "out.bin")
        assert (tmp_path / "out.bin").read_bytes() == data
        assert client.get(repo, desc.digest, offset=MiB, length=5) == data[MiB : MiB + 5]
        resumable = client.push(repo, data[:-1], resumable=True)
        assert resumable.digest == digest_of(data[:-1])
        assert client.push(f"{repo}-2", iter([data]), digest=desc.digest) == desc  # linked
    assert gateway.relayed() == 0
    assert gateway.calls("LocateBlob") == locates + 2
    assert gateway.calls("CommitUpload") == commits + 2


def test_through_the_gateway_when_blobsvc_is_unreachable(
    stack: Stack, repo: str, tmp_path: Path
) -> None:
    unreachable = metered(stack, "--blob-public-addr", f"127.0.0.1:{free_port()}")
    data = os.urandom(2 * MiB + 3)
    with Client(unreachable.address) as client:
        desc = client.push(repo, data)
        assert client.get(repo, desc.digest) == data
        assert client.push(repo, data[1:], resumable=True).digest == digest_of(data[1:])
    # Every byte crossed the gateway: pushed twice, pulled once.
    assert unreachable.relayed() == 3 * len(data) - 1
    # The upload started for the direct push was cancelled, not left behind.
    assert unreachable.calls("CancelUpload") == 1


def test_through_the_gateway_when_direct_access_is_not_offered(tmp_path: Path) -> None:
    with running_stack("sqlite", tmp_path, direct=False) as plain:
        gateway = metered(plain)
        data = os.urandom(2 * MiB)
        repo = f"client-direct/{secrets.token_hex(5)}"
        with Client(gateway.address) as client:
            desc = client.push(repo, data)
            for _ in range(3):
                assert client.get(repo, desc.digest) == data
            assert client.push(repo, data[1:], resumable=True).size == len(data) - 1
        # Asked once, then not again for a while.
        refused = gateway.calls("StartUpload", "FAILED_PRECONDITION") + gateway.calls(
            "LocateBlob", "FAILED_PRECONDITION"
        )
        assert refused == 1
        assert gateway.relayed() == 5 * len(data) - 1


def test_a_client_told_not_to_goes_through_the_gateway(gateway: Metered, repo: str) -> None:
    data = os.urandom(2 * MiB)
    relayed = gateway.relayed()
    with Client(gateway.address, direct=False) as client:
        desc = client.push(repo, data)
        assert client.get(repo, desc.digest) == data
    assert gateway.relayed() == relayed + 2 * len(data)


def test_an_expired_write_grant_is_renewed(stack: Stack, repo: str) -> None:
    short = metered(stack, "--grant-ttl", "1")
    data = os.urandom(MiB + 9)
    with Client(short.address) as client:
        upload = client.start_upload(repo, direct=True)
        assert upload.direct is not None
        time.sleep(2.1)  # past its expiry (whole seconds)
        renewals = short.calls("GetUpload")
        # blobsvc refuses it (UNAUTHENTICATED, grant=expired); the client gets a new one.
        assert client.append(upload, 0, [data]).offset == len(data)
        assert short.calls("GetUpload") == renewals + 1
        desc = client.commit_upload(repo, upload.id, digest_of(data))
        assert client.get(repo, desc.digest) == data
    assert short.relayed() == 0


def test_a_grant_expiring_mid_stream_is_renewed_and_the_write_resumes(
    stack: Stack, repo: str
) -> None:
    """blobsvc checks a write grant on every message: a slow stream outliving its grant is cut
    (what was staged stays), and the client renews the grant and resumes from the staged size."""
    short = metered(stack, "--grant-ttl", "2")
    pieces = [os.urandom(MiB) for _ in range(6)]

    def slow() -> Iterator[bytes]:
        for piece in pieces:
            time.sleep(0.7)
            yield piece

    data = b"".join(pieces)
    renewals = short.calls("GetUpload")
    with Client(short.address) as client:
        desc = client.push(repo, slow())
        assert desc.digest == digest_of(data)
        assert client.get(repo, desc.digest) == data
    assert short.calls("GetUpload") > renewals  # renewed at least once
    assert short.relayed() == 0


def test_a_new_client_reaches_blobsvc_at_once(gateway: Metered, repo: str) -> None:
    # Its first direct read does not wait for grpc's connectivity poller to notice a request to
    # connect (the poller's tick is 0.2 s).
    data = os.urandom(1000)
    with Client(gateway.address) as client:
        desc = client.push(repo, data)
    relayed = gateway.relayed()
    firsts = []
    for _ in range(5):
        with Client(gateway.address) as client:
            client.stat(repo, desc.digest)  # the gateway's channel is up
            start = time.perf_counter()
            assert client.get(repo, desc.digest) == data
            firsts.append(time.perf_counter() - start)
    assert gateway.relayed() == relayed  # read from blobsvc
    # The fastest of five, as a busy machine slows some.
    assert min(firsts) < 0.1, firsts


def test_abandoned_reads_are_let_go(gateway: Metered, repo: str) -> None:
    # A read from blobsvc is consumed in the reader's thread; when abandoned, grpc keeps its
    # call (and its memory) until the events of its cancellation are consumed, which the client
    # does.
    # Seen as grpc's per-call state objects (cygrpc._CallState) left in the process.
    data = os.urandom(4 * MiB)

    def calls() -> int:
        gc.collect()
        return sum(type(o).__name__ == "_CallState" for o in gc.get_objects())

    in_flight: list[int] = []

    class Stop(Exception):
        pass

    def stop(_: int) -> None:
        in_flight.append(calls())
        raise Stop

    with Client(gateway.address) as client:
        desc = client.push(repo, data)
        before = calls()
        for _ in range(20):
            with pytest.raises(Stop):
                client.pull(repo, desc.digest, io.BytesIO(), progress=stop)
        after = calls()
    assert in_flight == [before + 1] * 20  # what is counted is the read's call
    assert after == before
