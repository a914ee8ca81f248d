"""The client library and the gateway while garbage collection deletes a blob (issue 10).

Against a real stack (SQLite and PostgreSQL), the test plays the collector with linksvc's and
blobsvc's own calls: it unlinks a blob, marks it, fences it (deleting), and finishes the
deletion (blobsvc Delete, ForgetBlob) a few seconds later. Meanwhile the gateway answers a push
of that digest ABORTED / BLOB_DELETING after waiting a little, and the client library pushes,
puts and commits again by itself until the deletion has finished; a source it cannot read
again is the caller's to retry. Then the retry decisions, unit by unit.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from linkedblob.blob.v1 import blob_pb2, blob_pb2_grpc
from linkedblob.client import Client, ClientError
from linkedblob.client.errors import is_deleting, is_lease_expired, must_push_again
from linkedblob.client.push import _commit_again
from linkedblob.client.retry import Retry
from linkedblob.client.sources import SourceReader
from linkedblob.config import MiB
from linkedblob.link.v1 import link_pb2, link_pb2_grpc
from linkedblob.v1 import registry_pb2 as pb
from tests.stack import DB_KINDS, Stack, registry, rpc_error, running_stack

Code = grpc.StatusCode
FINISH_AFTER = 2.5  # seconds the collector takes to finish a deletion (more than the gateway waits)


@pytest.fixture(scope="module", params=DB_KINDS)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with running_stack(request.param, tmp_path_factory.mktemp("client-lifecycle")) as s:
        yield s


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


class Collector:
    """The collector's steps for one digest, made with linksvc's and blobsvc's calls."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.links = link_pb2_grpc.LinkServiceStub(stack.link.channel())  # type: ignore[no-untyped-call]
        self.blobs = blob_pb2_grpc.BlobServiceStub(stack.blob.channel())  # type: ignore[no-untyped-call]
        self.finisher: threading.Thread | None = None

    def fence(self, digest: str) -> int:
        """Marks the (unlinked) blob and fences it: deleting. The version the fence gave it."""
        self.links.MarkUnreferenced(link_pb2.MarkUnreferencedRequest())
        page = self.links.ListCollectable(
            link_pb2.ListCollectableRequest(grace_seconds=0, takeover_seconds=3600, page_size=1000)
        )
        (blob,) = [b for b in page.blobs if b.digest == digest]
        fenced = self.links.FenceBlob(
            link_pb2.FenceBlobRequest(digest=digest, version=blob.version)
        )
        assert fenced.fenced, fenced
        assert fenced.blob.state == link_pb2.IndexedBlob.DELETING
        return fenced.blob.version

    def finish(self, digest: str, version: int) -> None:
        self.blobs.Delete(
            blob_pb2.DeleteRequest(digest=digest), metadata=self.stack.blob_metadata()
        )
        forgot = self.links.ForgetBlob(link_pb2.ForgetBlobRequest(digest=digest, version=version))
        assert forgot.forgotten

    def finish_later(self, digest: str, version: int, after: float = FINISH_AFTER) -> None:
        def later() -> None:
            time.sleep(after)
            self.finish(digest, version)

        self.finisher = threading.Thread(target=later, daemon=True)
        self.finisher.start()

    def join(self) -> None:
        if self.finisher is not None:
            self.finisher.join(30)


def deleting(stack: Stack, client: Client, data: bytes) -> tuple[Collector, str, int]:
    """A blob pushed, unlinked and fenced: being deleted."""
    repo = f"gone/{secrets.token_hex(4)}"
    desc = client.push(repo, data)
    client.delete(repo, desc.digest)
    collector = Collector(stack)
    return collector, desc.digest, collector.fence(desc.digest)


@pytest.mark.parametrize("size", [1000, 3 * MiB], ids=["put", "stream"])
def test_a_push_of_a_blob_being_deleted_goes_through_once_the_deletion_finished(
    stack: Stack, size: int
) -> None:
    data = os.urandom(size)
    with Client(stack.address, retry_timeout=30) as client:
        collector, digest, version = deleting(stack, client, data)
        # The gateway waits a little (~1.5 s), then answers the caller.
        started = time.monotonic()
        with rpc_error(Code.ABORTED, "BLOB_DELETING"):
            registry(stack.address).PutBlob(pb.PutBlobRequest(repository="raw/repo", data=data))
        assert 1.0 < time.monotonic() - started < 5
        # The client library tries again until the deletion has finished.
        collector.finish_later(digest, version)
        repo = f"again/{secrets.token_hex(4)}"
        started = time.monotonic()
        desc = client.push(repo, data)
        assert time.monotonic() - started >= FINISH_AFTER - 0.5
        collector.join()
        assert desc.digest == digest
        assert client.get(repo, digest) == data


def test_a_file_and_a_commit_are_retried_and_a_spent_iterator_is_not(
    stack: Stack, tmp_path: Path
) -> None:
    data = os.urandom(2 * MiB + 5)
    with Client(stack.address, retry_timeout=30, direct=False) as client:
        # An iterator that was read from cannot be sent again: the caller gets the error.
        collector, digest, version = deleting(stack, client, data)
        repo = f"again/{secrets.token_hex(4)}"
        with pytest.raises(ClientError) as exc_info:
            client.push(repo, iter([data[:MiB], data[MiB:]]))
        assert is_deleting(exc_info.value)
        # A file is read again from its start.
        path = tmp_path / "blob"
        path.write_bytes(data)
        shown: list[int] = []
        collector.finish_later(digest, version)
        assert client.push(repo, path, progress=shown.append).digest == digest
        collector.join()
        assert sum(shown) == len(data)  # what an attempt showed was taken back
        assert client.get(repo, digest) == data

        # A commit of an upload waits for the deletion too.
        data = os.urandom(MiB)
        collector, digest, version = deleting(stack, client, data)
        upload = client.start_upload(repo)
        client.write_upload(repo, upload.id, 0, [data])
        collector.finish_later(digest, version)
        assert client.commit_upload(repo, upload.id, digest).size == len(data)
        collector.join()
        assert client.get(repo, digest) == data


def test_a_marked_blob_is_revived_by_a_push(stack: Stack) -> None:
    data = os.urandom(5000)
    with Client(stack.address) as client:
        repo = f"marked/{secrets.token_hex(4)}"
        desc = client.push(repo, data)
        client.delete(repo, desc.digest)
        collector = Collector(stack)
        collector.links.MarkUnreferenced(link_pb2.MarkUnreferencedRequest())
        client.push(repo, data)
        blobs = collector.links.ListBlobs(link_pb2.ListBlobsRequest(page_size=1000)).blobs
        (blob,) = [b for b in blobs if b.digest == desc.digest]
        assert blob.state == link_pb2.IndexedBlob.ACTIVE
        # The collector's version no longer matches: no fence.
        fenced = collector.links.FenceBlob(
            link_pb2.FenceBlobRequest(digest=desc.digest, version=blob.version - 1)
        )
        assert not fenced.fenced
        assert client.get(repo, desc.digest) == data


# --- the retry decisions ------------------------------------------------------------------------


def error(code: grpc.StatusCode, reason: str) -> ClientError:
    return ClientError(code, reason, "test")


def test_which_failures_send_the_bytes_again() -> None:
    deleting_ = error(Code.ABORTED, "BLOB_DELETING")
    expired = error(Code.ABORTED, "BLOB_UPLOAD_INVALID")
    for e in (deleting_, expired):
        assert must_push_again(e)
    assert is_deleting(deleting_) and not is_deleting(expired)
    assert is_lease_expired(expired) and not is_lease_expired(deleting_)
    for other in (
        error(Code.UNAVAILABLE, "UNAVAILABLE"),
        error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"),
        error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"),
        error(Code.OUT_OF_RANGE, "BLOB_UPLOAD_INVALID"),
    ):
        assert not must_push_again(other)
    # A push's commit is made again on a transient failure and while a blob is being
    # deleted, but not after its lease expired (the whole push is: its bytes may be gone).
    assert _commit_again(deleting_) and _commit_again(error(Code.UNAVAILABLE, ""))
    assert not _commit_again(expired)
    assert not _commit_again(error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"))


def test_the_retry_helper_takes_a_decision_and_keeps_its_budget() -> None:
    attempts: list[int] = []

    def failing() -> int:
        attempts.append(1)
        raise error(Code.ABORTED, "BLOB_DELETING")

    with pytest.raises(ClientError):
        Retry(0.2).call(failing, is_deleting)
    assert 2 <= len(attempts) <= 5  # 50, 100 ms... until the budget is spent
    attempts.clear()
    with pytest.raises(ClientError):
        Retry(5).call(failing, lambda e: False)
    assert len(attempts) == 1


def test_which_sources_can_be_sent_again(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abcdef")
    for source in (b"abcdef", memoryview(b"abcdef"), path, io.BytesIO(b"abcdef")):
        with SourceReader(source) as src:
            assert b"".join(bytes(c) for c in src.chunks(4)) == b"abcdef"
            assert src.rewind()
            assert b"".join(bytes(c) for c in src.chunks(4)) == b"abcdef"
    with SourceReader(iter([b"abc", b"def"])) as src:
        assert src.rewind()  # nothing taken yet
        assert b"".join(bytes(c) for c in src.chunks(4)) == b"abcdef"
        assert not src.rewind()
