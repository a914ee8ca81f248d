"""linkedblob.client against a real gateway, blobsvc and linksvc (SQLite): pushes from every
kind of source, verified pulls (a corrupted store is caught), and the other calls; each with
direct access to blobsvc offered (bytes go straight to it) and without (through the gateway)."""

from __future__ import annotations

import collections
import errno
import hashlib
import io
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import IO, cast

import grpc
import pytest

from linkedblob.client import (
    Client,
    ClientError,
    Descriptor,
    DigestMismatchError,
)
from linkedblob.config import MiB
from linkedblob.transport import channel_options
from tests.stack import Stack, running_stack

Code = grpc.StatusCode


@pytest.fixture(scope="module", params=["direct", "relay"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    direct = request.param == "direct"
    with running_stack("sqlite", tmp_path_factory.mktemp("client"), direct=direct) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[Client]:
    with Client(stack.address) as c:
        yield c


@pytest.fixture
def repo() -> str:
    return f"client/{secrets.token_hex(5)}"


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def stored_file(stack: Stack, digest: str) -> Path:
    """The file blobsvc keeps a blob in (found by its hex name, whatever the layout)."""
    hexpart = digest.partition(":")[2]
    (path,) = [p for p in (stack.data / "blobs").rglob(hexpart) if p.is_file()]
    return path


def test_push_from_every_kind_of_source(client: Client, repo: str, tmp_path: Path) -> None:
    big = os.urandom(3 * MiB + 1)
    small = os.urandom(1000)
    path = tmp_path / "big.bin"
    path.write_bytes(big)
    seen: list[int] = []
    assert client.push(repo, path, progress=seen.append) == Descriptor(digest_of(big), len(big))
    assert sum(seen) == len(big)
    assert client.push(repo, str(path)).digest == digest_of(big)
    assert client.push(repo, small, media_type="text/plain") == Descriptor(
        digest_of(small), len(small), "text/plain"
    )
    assert client.push(repo, big).digest == digest_of(big)
    # A file from its current position.
    f = io.BytesIO(b"skip" + small)
    f.seek(4)
    assert client.push(repo, f).digest == digest_of(small)
    # An iterable of chunks of any size (split to the message limit); not seekable.
    pieces = [big[:10], big[10 : 5 * MiB], big[5 * MiB :]]
    assert client.push(repo, iter(pieces)).digest == digest_of(big)
    assert client.push(repo, b"").digest == digest_of(b"")
    for data in (big, small, b""):
        assert client.get(repo, digest_of(data)) == data


def test_push_with_a_declared_digest(client: Client, repo: str) -> None:
    data = os.urandom(2 * MiB)
    digest = digest_of(data)
    assert client.push(repo, data, digest=digest).digest == digest
    # Already stored: linked from the header (the rest of the stream is not needed).
    other = f"{repo}-again"
    assert client.push(other, iter([data]), digest=digest).digest == digest
    assert client.stat(other, digest).size == len(data)
    with pytest.raises(ClientError) as err:
        client.push(repo, os.urandom(2 * MiB), digest=digest_of(os.urandom(8)))
    assert (err.value.code, err.value.reason) == (Code.INVALID_ARGUMENT, "DIGEST_INVALID")
    sha512 = digest_of(data, "sha512")
    assert client.push(repo, data, digest=sha512).digest == sha512
    assert client.get(repo, sha512) == data


def test_resumable_push(client: Client, repo: str, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + 5)
    path = tmp_path / "blob"
    path.write_bytes(data)
    seen: list[int] = []
    desc = client.push(repo, path, resumable=True, media_type="a/b", progress=seen.append)
    assert desc == Descriptor(digest_of(data), len(data), "a/b")
    assert sum(seen) == len(data)
    assert client.push(repo, data, resumable=True, digest=digest_of(data)).digest == desc.digest
    assert client.push(repo, b"", resumable=True).digest == digest_of(b"")
    with pytest.raises(ValueError):
        client.push(repo, iter([data]), resumable=True)
    with pytest.raises(ClientError) as err:
        client.push(repo, data, resumable=True, digest=digest_of(b"other"))
    assert err.value.reason == "DIGEST_INVALID"


def test_pull_to_a_path_and_to_a_file(client: Client, repo: str, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 7)
    desc = client.push(repo, data, media_type="a/b")
    out = tmp_path / "out.bin"
    seen: list[int] = []
    assert client.pull(repo, desc.digest, out, progress=seen.append) == desc
    assert out.read_bytes() == data
    assert sum(seen) == len(data)
    buffer = io.BytesIO()
    client.pull(repo, desc.digest, buffer, offset=MiB, length=10)
    assert buffer.getvalue() == data[MiB : MiB + 10]
    assert client.get(repo, desc.digest, offset=len(data) - 3) == data[-3:]
    assert not list(tmp_path.glob(".*part*"))  # no temporary file left


def test_pull_verifies_the_digest(stack: Stack, client: Client, repo: str, tmp_path: Path) -> None:
    data = os.urandom(MiB + 100)
    desc = client.push(repo, data)
    stored = stored_file(stack, desc.digest)
    corrupted = bytearray(data)
    corrupted[MiB] ^= 0xFF
    stored.chmod(0o644)
    stored.write_bytes(bytes(corrupted))  # same size, one byte flipped
    out = tmp_path / "out.bin"
    with pytest.raises(DigestMismatchError) as err:
        client.pull(repo, desc.digest, out)
    assert err.value.reason == "DIGEST_INVALID"
    assert not out.exists()  # nothing half-verified left behind
    assert not list(tmp_path.glob(".*part*"))
    with pytest.raises(DigestMismatchError):
        client.get(repo, desc.digest)
    # A range cannot be checked against the digest; it is what the store holds.
    assert client.get(repo, desc.digest, offset=MiB, length=1) == bytes(corrupted[MiB : MiB + 1])
    stored.write_bytes(data)
    client.pull(repo, desc.digest, out)
    assert out.read_bytes() == data


def test_a_truncated_blob_is_not_passed_off_as_complete(
    stack: Stack, client: Client, repo: str, tmp_path: Path
) -> None:
    data = os.urandom(2 * MiB)
    desc = client.push(repo, data)
    stored = stored_file(stack, desc.digest)
    stored.chmod(0o644)
    stored.write_bytes(data[: MiB + 1])
    try:
        with pytest.raises(ClientError) as err:
            client.pull(repo, desc.digest, tmp_path / "out")
        assert err.value.code == Code.DATA_LOSS
        assert not (tmp_path / "out").exists()
    finally:
        stored.write_bytes(data)


class Observer(grpc.GenericRpcHandler):
    """A gRPC relay in front of a server (bytes as they are, any method) that keeps count of
    the calls in flight through it and of the messages sent to each method: what a client does
    is seen from the server's side."""

    def __init__(self, upstream: str) -> None:
        self.channel = grpc.insecure_channel(upstream, options=channel_options())
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.messages: collections.Counter[str] = collections.Counter()
        self.changed = threading.Condition()
        self.server = grpc.server(futures.ThreadPoolExecutor(8), options=channel_options())
        self.server.add_generic_rpc_handlers((self,))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = details.method  # type: ignore[attr-defined]
        upstream = self.channel.stream_stream(method)

        def counted(requests: Iterator[bytes]) -> Iterator[bytes]:
            for request in requests:
                self.messages[method] += 1
                yield request

        def relay(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            with self.changed:
                self.in_flight[method] += 1
            context.add_callback(lambda: self._ended(method))
            responses = upstream(counted(requests), metadata=context.invocation_metadata())
            context.add_callback(responses.cancel)
            try:
                yield from responses
            except grpc.RpcError as err:
                context.set_trailing_metadata(err.trailing_metadata())  # type: ignore[attr-defined]
                context.set_code(err.code())  # type: ignore[attr-defined]
                context.set_details(err.details())  # type: ignore[attr-defined]

        return grpc.stream_stream_rpc_method_handler(relay)

    def _ended(self, method: str) -> None:
        with self.changed:
            self.in_flight[method] -= 1
            self.changed.notify_all()

    def wait_ended(self, method: str, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.in_flight[method] == 0, timeout)

    def stop(self) -> None:
        self.server.stop(None)
        self.channel.close()


class FullDisk(io.RawIOBase):
    """A destination that fails its first write, noting whether the read was in flight."""

    def __init__(self, reading: Callable[[], bool]) -> None:
        self.reading = reading
        self.seen: list[bool] = []

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:  # type: ignore[override]
        self.seen.append(self.reading())
        raise OSError(errno.ENOSPC, "No space left on device")


def test_an_abandoned_pull_ends_its_read(stack: Stack, repo: str, tmp_path: Path) -> None:
    data = os.urandom(16 * MiB)
    with Client(stack.address) as c:
        desc = c.push(repo, data)
    observer, address = observed(stack)
    if stack.grant_secret:
        read = "/linkedblob.blob.v1.BlobService/Read"
    else:
        read = "/linkedblob.v1.Registry/ReadBlob"
    try:
        with Client(address) as client:
            for _ in range(3):  # the same client, again and again
                full = FullDisk(lambda: observer.in_flight[read] == 1)
                with pytest.raises(OSError) as err:
                    client.pull(repo, desc.digest, cast(IO[bytes], full))
                assert full.seen == [True]
                # Ended at once, not when the exception (whose traceback holds the read) goes.
                assert observer.wait_ended(read, timeout=5)
                assert err.value.errno == errno.ENOSPC
            with pytest.raises(FileNotFoundError) as missing:
                client.pull(repo, desc.digest, tmp_path / "no" / "such" / "dir")
            assert observer.wait_ended(read, timeout=5), missing
            assert client.get(repo, desc.digest, offset=MiB, length=3) == data[MiB : MiB + 3]
            assert client.pull(repo, desc.digest, tmp_path / "out") == desc
            assert (tmp_path / "out").read_bytes() == data
            assert observer.wait_ended(read, timeout=5)
    finally:
        observer.stop()


def observed(stack: Stack) -> tuple[Observer, str]:
    """An observer of the stack's data path, and the gateway address that takes it: in front of
    blobsvc (direct access) or of the gateway."""
    if stack.grant_secret:
        observer = Observer(stack.blob.address)
        args = ("--blob-public-addr", observer.address)
        return observer, stack.another_gateway(enable_delete=False, args=args).address
    observer = Observer(stack.address)
    return observer, observer.address


def test_pieces_of_any_size_go_in_whole_messages(stack: Stack, repo: str) -> None:
    data = os.urandom(3 * MiB + 5)  # three whole messages of 1 MiB and 5 bytes
    step = 64 * 1024
    small = [data[i : i + step] for i in range(0, len(data), step)]
    half = 20 * step  # 1.25 MiB: two messages
    twice = data + data  # 6 MiB + 10: seven messages, from a piece above the 4 MiB limit
    observer, address = observed(stack)
    try:
        with Client(address, chunk_size=MiB) as client:
            seen: list[int] = []
            assert client.push(repo, iter(small), progress=seen.append).digest == digest_of(data)
            assert sum(seen) == len(data)
            upload = client.start_upload(repo, direct=True)
            upload = client.append(upload, 0, small[:20])
            upload = client.append(upload, half, [data[half : half + 10], data[half + 10 :]])
            assert client.commit_upload(repo, upload.id, digest_of(data)).size == len(data)
            desc = client.push(repo, iter([twice[:10], twice[10:]]))
            assert desc.digest == digest_of(twice)
            assert client.get(repo, desc.digest) == twice
    finally:
        observer.stop()
    # Each stream: a header, then data messages of 1 MiB (64 KiB pieces are not sent one a
    # message, nor a 6 MiB piece in one).
    if stack.grant_secret:
        writes = observer.messages["/linkedblob.blob.v1.BlobService/Write"]
        assert writes == (1 + 4) + (1 + 2) + (1 + 2) + (1 + 7)
    else:
        assert observer.messages["/linkedblob.v1.Registry/PushBlob"] == (1 + 4) + (1 + 7)
        assert observer.messages["/linkedblob.v1.Registry/WriteUpload"] == (1 + 2) + (1 + 2)


def test_stat_mount_list_delete(client: Client, repo: str) -> None:
    other = f"{repo}-other"
    descs = sorted((client.push(repo, os.urandom(100)) for _ in range(5)), key=lambda d: d.digest)
    assert client.stat(repo, descs[0].digest) == descs[0]
    assert client.exists(repo, descs[0].digest)
    assert not client.exists(other, descs[0].digest)
    assert list(client.list_blobs(repo, page_size=2)) == descs
    assert client.mount(other, descs[1].digest, from_repository=repo) == descs[1]
    assert client.mount(f"{repo}-third", descs[2].digest).digest == descs[2].digest
    names = list(client.list_repositories(page_size=1))
    assert {repo, other, f"{repo}-third"} <= set(names) and names == sorted(names)
    client.delete(repo, descs[0].digest)
    assert not client.exists(repo, descs[0].digest)
    with pytest.raises(ClientError) as err:
        client.delete(repo, descs[0].digest)
    assert (err.value.code, err.value.reason) == (Code.NOT_FOUND, "BLOB_UNKNOWN")


def test_errors_carry_code_and_reason(client: Client, repo: str) -> None:
    with pytest.raises(ClientError) as err:
        client.stat(repo, digest_of(b"nothing here"))
    assert (err.value.code, err.value.reason) == (Code.NOT_FOUND, "BLOB_UNKNOWN")
    assert "NOT_FOUND/BLOB_UNKNOWN" in str(err.value)
    assert isinstance(err.value.__cause__, grpc.RpcError)
    with pytest.raises(ClientError) as err:
        client.pull(repo, "sha256:bad", io.BytesIO())
    assert err.value.reason == "DIGEST_INVALID"
    with pytest.raises(ClientError) as err:
        client.mount(repo, digest_of(b"x"), from_repository="Not/Valid")
    assert err.value.reason == "NAME_INVALID"


def test_default_address_from_the_environment(
    stack: Stack, repo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LINKEDBLOB_ADDR", stack.address)
    with Client() as c:
        assert c.addr == stack.address
        assert c.push(repo, b"env").digest == digest_of(b"env")
