"""blobsvc end to end: every call of linkedblob.blob.v1.BlobService against a real server
(`linkedblob serve blob` on port 0), on each storage driver, good input and bad.

Every refusal is checked for its code and ErrorInfo reason, and for having changed nothing.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from linkedblob.blob.v1 import blob_pb2 as pb
from linkedblob.blob.v1 import blob_pb2_grpc
from linkedblob.config import MAX_CHUNK_BYTES, STREAM_CHUNK_BYTES
from linkedblob.digests import EMPTY
from linkedblob.errors import Reason, error_info
from tests.services import ServiceProcess, running

Code = grpc.StatusCode
MiB = 1024 * 1024


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha512(data: bytes) -> str:
    return "sha512:" + hashlib.sha512(data).hexdigest()


@contextmanager
def refused(code: grpc.StatusCode, reason: Reason | str) -> Iterator[list[grpc.RpcError]]:
    """Expects the block to fail with ``code`` and ErrorInfo ``reason``; yields [error]."""
    caught: list[grpc.RpcError] = []
    with pytest.raises(grpc.RpcError) as excinfo:
        yield caught
    err = excinfo.value
    caught.append(err)
    assert err.code() == code, f"{err.code()}: {err.details()}"  # type: ignore[attr-defined]
    info = error_info(err)
    assert info is not None, f"no ErrorInfo on {err.code()}: {err.details()}"  # type: ignore[attr-defined]
    assert info.reason == str(reason), info


def write_requests(
    upload_id: str,
    data: bytes,
    offset: int = 0,
    chunk: int = STREAM_CHUNK_BYTES,
    **first: object,
) -> Iterator[pb.WriteRequest]:
    """A Write stream: the first message names the upload (and carries the first chunk)."""
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
    yield pb.WriteRequest(upload_id=upload_id, offset=offset, data=chunks[0], **first)  # type: ignore[arg-type]
    for piece in chunks[1:]:
        yield pb.WriteRequest(data=piece)


def read_all(
    stub: blob_pb2_grpc.BlobServiceStub, digest: str, offset: int = 0, limit: int = 0
) -> bytes:
    return b"".join(
        m.data for m in stub.Read(pb.ReadRequest(digest=digest, offset=offset, limit=limit))
    )


def status(stub: blob_pb2_grpc.BlobServiceStub, upload_id: str) -> int | None:
    try:
        return stub.UploadStatus(pb.UploadStatusRequest(upload_id=upload_id)).size
    except grpc.RpcError as err:
        if err.code() == Code.NOT_FOUND:  # type: ignore[attr-defined]
            return None
        raise


def stored(stub: blob_pb2_grpc.BlobServiceStub, digest: str) -> bool:
    return not stub.FindMissing(pb.FindMissingRequest(digests=[digest])).missing


@pytest.fixture(scope="module", params=["filesystem", "memory"])
def blobsvc(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    data = tmp_path_factory.mktemp("blobs")
    with running(
        "blob", "--data", str(data), "--storage", request.param, "--log-level", "WARNING"
    ) as svc:
        svc.data = data  # type: ignore[attr-defined]
        svc.storage = request.param  # type: ignore[attr-defined]
        yield svc


@pytest.fixture
def stub(blobsvc: ServiceProcess) -> Iterator[blob_pb2_grpc.BlobServiceStub]:
    with blobsvc.channel() as channel:
        yield blob_pb2_grpc.BlobServiceStub(channel)


def unique(n: int = 64) -> bytes:
    return os.urandom(n)


def uid() -> str:
    return "u-" + os.urandom(8).hex()


# --- Stat, Put, Read --------------------------------------------------------------------------


def test_put_stat_read_round_trip(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    data = unique(1000)
    put = stub.Put(pb.PutRequest(data=data))
    assert (put.blob.digest, put.blob.size, put.already_existed) == (sha256(data), 1000, False)
    assert stub.Stat(pb.StatRequest(digest=sha256(data))).blob.size == 1000
    assert read_all(stub, sha256(data)) == data
    again = stub.Put(pb.PutRequest(data=data, digest=sha256(data)))
    assert again.already_existed and again.blob.digest == sha256(data)


def test_put_sha512_with_expected_digest(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    data = unique()
    put = stub.Put(pb.PutRequest(data=data, digest=sha512(data)))
    assert put.blob.digest == sha512(data)
    assert read_all(stub, sha512(data)) == data
    assert not stored(stub, sha256(data))


@pytest.mark.parametrize(
    "digest",
    [
        "",
        "sha256:xyz",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "md5:" + "a" * 32,
        "sha256/" + "a" * 64,
        "../../etc/passwd",
    ],
)
def test_malformed_digests_are_refused_everywhere(
    stub: blob_pb2_grpc.BlobServiceStub, digest: str
) -> None:
    with refused(Code.INVALID_ARGUMENT, Reason.DIGEST_INVALID):
        stub.Stat(pb.StatRequest(digest=digest))
    with refused(Code.INVALID_ARGUMENT, Reason.DIGEST_INVALID):
        read_all(stub, digest)
    with refused(Code.INVALID_ARGUMENT, Reason.DIGEST_INVALID):
        stub.FindMissing(pb.FindMissingRequest(digests=[sha256(b"x"), digest]))
    with refused(Code.INVALID_ARGUMENT, Reason.DIGEST_INVALID):
        stub.Delete(pb.DeleteRequest(digest=digest))
    if digest:  # (empty means "whatever it hashes to" for Put)
        data = unique()
        with refused(Code.INVALID_ARGUMENT, Reason.DIGEST_INVALID):
            stub.Put(pb.PutRequest(data=data, digest=digest))
        assert not stored(stub, sha256(data))


def test_stat_and_read_of_absent_blob(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    absent = sha256(unique())
    with refused(Code.NOT_FOUND, Reason.BLOB_UNKNOWN):
        stub.Stat(pb.StatRequest(digest=absent))
    with refused(Code.NOT_FOUND, Reason.BLOB_UNKNOWN):
        read_all(stub, absent)


def test_put_with_wrong_digest_stores_nothing(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    data, other = unique(), unique()
    with refused(Code.INVALID_ARGUMENT, Reason.DIGEST_INVALID) as caught:
        stub.Put(pb.PutRequest(data=data, digest=sha256(other)))
    info = error_info(caught[0])
    assert info is not None and info.metadata["digest"] == sha256(data)
    assert not stored(stub, sha256(data))
    assert not stored(stub, sha256(other))


def test_put_over_the_chunk_limit_is_refused(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    data = unique(16) * ((MAX_CHUNK_BYTES + 16) // 16)
    with refused(Code.RESOURCE_EXHAUSTED, Reason.SIZE_INVALID):
        stub.Put(pb.PutRequest(data=data))
    assert not stored(stub, sha256(data))
    # exactly at the limit is fine
    at_limit = data[:MAX_CHUNK_BYTES]
    assert stub.Put(pb.PutRequest(data=at_limit)).blob.size == MAX_CHUNK_BYTES


def test_read_streams_chunks_and_honours_offset_and_limit(
    stub: blob_pb2_grpc.BlobServiceStub,
) -> None:
    data = unique(3 * MiB + 12345)
    digest = stub.Write(write_requests(uid(), data, commit=True)).blob.digest
    chunks = [m.data for m in stub.Read(pb.ReadRequest(digest=digest))]
    assert b"".join(chunks) == data
    assert len(chunks) == 4 and all(len(c) <= STREAM_CHUNK_BYTES for c in chunks)
    assert read_all(stub, digest, offset=5) == data[5:]
    assert read_all(stub, digest, offset=MiB - 3, limit=MiB + 10) == data[MiB - 3 : 2 * MiB + 7]
    assert read_all(stub, digest, limit=1) == data[:1]
    assert read_all(stub, digest, offset=len(data) - 2, limit=100) == data[-2:]
    assert read_all(stub, digest, offset=len(data)) == b""


def test_read_range_errors(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    data = unique(100)
    digest = stub.Put(pb.PutRequest(data=data)).blob.digest
    with refused(Code.OUT_OF_RANGE, Reason.RANGE_INVALID):
        read_all(stub, digest, offset=101)
    with refused(Code.INVALID_ARGUMENT, Reason.RANGE_INVALID):
        read_all(stub, digest, offset=-1)
    with refused(Code.INVALID_ARGUMENT, Reason.RANGE_INVALID):
        read_all(stub, digest, limit=-1)
    assert read_all(stub, digest) == data


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_the_empty_blob_is_always_present(
    stub: blob_pb2_grpc.BlobServiceStub, algorithm: str
) -> None:
    empty = str(EMPTY[algorithm])
    assert stub.Stat(pb.StatRequest(digest=empty)).blob.size == 0
    assert list(stub.Read(pb.ReadRequest(digest=empty))) == []
    with refused(Code.OUT_OF_RANGE, Reason.RANGE_INVALID):
        read_all(stub, empty, offset=1)
    assert list(stub.FindMissing(pb.FindMissingRequest(digests=[empty])).missing) == []
    put = stub.Put(pb.PutRequest(data=b"", digest=empty if algorithm == "sha512" else ""))
    assert (put.blob.digest, put.blob.size) == (empty, 0)
    # an empty upload commits, under the upload's algorithm or the given digest
    upload_id = uid()
    stub.Write(write_requests(upload_id, b"", algorithm=algorithm))
    committed = stub.Commit(pb.CommitRequest(upload_id=upload_id))
    assert (committed.blob.digest, committed.blob.size) == (empty, 0)
    assert status(stub, upload_id) is None
    written = stub.Write(write_requests(uid(), b"", commit=True, commit_digest=empty))
    assert written.blob.digest == empty
    assert list(stub.Read(pb.ReadRequest(digest=empty))) == []


def test_find_missing(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    present = stub.Put(pb.PutRequest(data=unique())).blob.digest
    absent = [sha256(unique()), sha512(unique())]
    request = pb.FindMissingRequest(digests=[absent[0], present, str(EMPTY["sha256"]), absent[1]])
    assert list(stub.FindMissing(request).missing) == absent
    assert list(stub.FindMissing(pb.FindMissingRequest()).missing) == []
    many = [sha256(i.to_bytes(4, "big")) for i in range(1000)]
    assert len(stub.FindMissing(pb.FindMissingRequest(digests=many)).missing) == 1000
    with refused(Code.INVALID_ARGUMENT, Reason.PAGINATION_INVALID):
        stub.FindMissing(pb.FindMissingRequest(digests=[*many, present]))


def test_delete(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    data = unique()
    digest = stub.Put(pb.PutRequest(data=data)).blob.digest
    assert stub.Delete(pb.DeleteRequest(digest=digest)).deleted
    assert not stored(stub, digest)
    with refused(Code.NOT_FOUND, Reason.BLOB_UNKNOWN):
        stub.Stat(pb.StatRequest(digest=digest))
    assert not stub.Delete(pb.DeleteRequest(digest=digest)).deleted


# --- uploads ----------------------------------------------------------------------------------


def test_resumable_upload_then_commit(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    data = unique(2 * MiB + 777)
    upload_id = uid()
    assert status(stub, upload_id) is None
    first = stub.Write(write_requests(upload_id, data[: MiB + 5]))
    assert first.size == MiB + 5 and not first.HasField("blob")
    assert status(stub, upload_id) == MiB + 5
    second = stub.Write(write_requests(upload_id, data[MiB + 5 :], offset=MiB + 5))
    assert second.size == len(data)
    committed = stub.Commit(
        pb.CommitRequest(upload_id=upload_id, digest=sha256(data), size=len(data))
    )
    assert (committed.blob.digest, committed.blob.size) == (sha256(data), len(data))
    assert not committed.already_existed
    assert status(stub, upload_id) is None  # the upload is gone
    with refused(Code.NOT_FOUND, Reason.BLOB_UPLOAD_UNKNOWN):
        stub.Commit(pb.CommitRequest(upload_id=upload_id, digest=sha256(data)))
    assert read_all(stub, sha256(data)) == data


def test_write_with_commit_in_one_stream(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    data = unique(MiB + 1)
    upload_id = uid()
    response = stub.Write(
        write_requests(
            upload_id, data, commit=True, commit_digest=sha256(data), commit_size=len(data)
        )
    )
    assert (response.size, response.blob.digest, response.blob.size) == (
        len(data),
        sha256(data),
        len(data),
    )
    assert not response.already_existed
    assert status(stub, upload_id) is None
    again = stub.Write(write_requests(uid(), data, commit=True))
    assert again.already_existed and again.blob.digest == sha256(data)
    assert read_all(stub, sha256(data)) == data


def test_commit_without_digest_uses_the_upload_algorithm(
    stub: blob_pb2_grpc.BlobServiceStub,
) -> None:
    data = unique(5000)
    upload_id = uid()
    stub.Write(write_requests(upload_id, data, algorithm="sha512"))
    committed = stub.Commit(pb.CommitRequest(upload_id=upload_id))
    assert committed.blob.digest == sha512(data)
    assert read_all(stub, sha512(data)) == data


def test_commit_with_another_algorithm_rehashes(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    data = unique(3000)
    upload_id = uid()
    stub.Write(write_requests(upload_id, data))  # hashed with sha256 as it arrives
    committed = stub.Commit(pb.CommitRequest(upload_id=upload_id, digest=sha512(data)))
    assert committed.blob.digest == sha512(data)
    assert read_all(stub, sha512(data)) == data


def test_wrong_offset_is_refused_with_the_staged_size(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    data = unique(3000)
    upload_id = uid()
    stub.Write(write_requests(upload_id, data[:1000]))
    for offset in (0, 999, 1001, 5000):
        with refused(Code.OUT_OF_RANGE, Reason.BLOB_UPLOAD_INVALID) as caught:
            stub.Write(write_requests(upload_id, b"garbage", offset=offset))
        info = error_info(caught[0])
        assert info is not None and info.metadata["size"] == "1000"
    assert status(stub, upload_id) == 1000
    stub.Write(write_requests(upload_id, data[1000:], offset=1000))
    committed = stub.Commit(pb.CommitRequest(upload_id=upload_id, digest=sha256(data)))
    assert committed.blob.digest == sha256(data)  # staged bytes were left intact


def test_unknown_upload_at_an_offset_is_not_created(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    upload_id = uid()
    with refused(Code.NOT_FOUND, Reason.BLOB_UPLOAD_UNKNOWN):
        stub.Write(write_requests(upload_id, b"abc", offset=10))
    assert status(stub, upload_id) is None
    with refused(Code.NOT_FOUND, Reason.BLOB_UPLOAD_UNKNOWN):
        stub.UploadStatus(pb.UploadStatusRequest(upload_id=upload_id))
    with refused(Code.NOT_FOUND, Reason.BLOB_UPLOAD_UNKNOWN):
        stub.Commit(pb.CommitRequest(upload_id=upload_id))
    stub.Abort(pb.AbortRequest(upload_id=upload_id))  # idempotent


@pytest.mark.parametrize(
    "upload_id", ["", "../etc", "a/b", "a.b", "x" * 129, "ünïcode", "a b", "..", "id\x00"]
)
def test_malformed_upload_ids_are_refused(
    stub: blob_pb2_grpc.BlobServiceStub, upload_id: str
) -> None:
    invalid = (Code.INVALID_ARGUMENT, Reason.BLOB_UPLOAD_INVALID)
    with refused(*invalid):
        stub.Write(write_requests(upload_id, b"data"))
    with refused(*invalid):
        stub.UploadStatus(pb.UploadStatusRequest(upload_id=upload_id))
    with refused(*invalid):
        stub.Commit(pb.CommitRequest(upload_id=upload_id))
    with refused(*invalid):
        stub.Abort(pb.AbortRequest(upload_id=upload_id))


def test_longest_upload_id_is_accepted(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    upload_id = "A-z_9" * 25 + "abc"
    assert len(upload_id) == 128
    assert stub.Write(write_requests(upload_id, b"ok")).size == 2
    stub.Abort(pb.AbortRequest(upload_id=upload_id))


def test_bad_write_streams_create_nothing(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    upload_id = uid()
    with refused(Code.INVALID_ARGUMENT, Reason.BLOB_UPLOAD_INVALID):
        stub.Write(iter([]))
    with refused(Code.INVALID_ARGUMENT, Reason.BLOB_UPLOAD_INVALID):
        stub.Write(write_requests(upload_id, b"abc", offset=-1))
    with refused(Code.INVALID_ARGUMENT, Reason.DIGEST_INVALID):
        stub.Write(write_requests(upload_id, b"abc", algorithm="md5"))
    with refused(Code.INVALID_ARGUMENT, Reason.DIGEST_INVALID):
        stub.Write(write_requests(upload_id, b"abc", commit=True, commit_digest="sha256:nope"))
    assert status(stub, upload_id) is None


def test_oversize_data_message_is_refused_and_not_written(
    stub: blob_pb2_grpc.BlobServiceStub,
) -> None:
    upload_id = uid()
    good = unique(1000)
    too_big = unique(16) * ((MAX_CHUNK_BYTES + 16) // 16)

    def stream() -> Iterator[pb.WriteRequest]:
        yield pb.WriteRequest(upload_id=upload_id, data=good)
        yield pb.WriteRequest(data=too_big)
        yield pb.WriteRequest(data=b"never")

    with refused(Code.RESOURCE_EXHAUSTED, Reason.SIZE_INVALID):
        stub.Write(stream())
    assert status(stub, upload_id) == 1000  # what came before stays, the oversize one did not land
    assert stub.Commit(pb.CommitRequest(upload_id=upload_id, digest=sha256(good))).blob.size == 1000
    # the limit itself is accepted
    at_limit = stub.Write(write_requests(uid(), too_big[:MAX_CHUNK_BYTES], chunk=MAX_CHUNK_BYTES))
    assert at_limit.size == MAX_CHUNK_BYTES


def test_digest_mismatch_keeps_the_staging_for_a_retry(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    data = unique(4000)
    upload_id = uid()
    stub.Write(write_requests(upload_id, data))
    wrong = sha256(b"something else")
    with refused(Code.INVALID_ARGUMENT, Reason.DIGEST_INVALID) as caught:
        stub.Commit(pb.CommitRequest(upload_id=upload_id, digest=wrong))
    info = error_info(caught[0])
    assert info is not None and info.metadata["digest"] == sha256(data)
    assert not stored(stub, wrong) and not stored(stub, sha256(data))
    assert status(stub, upload_id) == 4000
    with refused(Code.INVALID_ARGUMENT, Reason.SIZE_INVALID) as caught:
        stub.Commit(pb.CommitRequest(upload_id=upload_id, digest=sha256(data), size=3999))
    info = error_info(caught[0])
    assert info is not None and info.metadata["size"] == "4000"
    assert status(stub, upload_id) == 4000 and not stored(stub, sha256(data))
    with refused(Code.INVALID_ARGUMENT, Reason.DIGEST_INVALID):
        stub.Commit(pb.CommitRequest(upload_id=upload_id, digest="sha256:bad"))
    # the same through Write's commit-at-end
    with refused(Code.INVALID_ARGUMENT, Reason.DIGEST_INVALID):
        stub.Write(write_requests(upload_id, b"", offset=4000, commit=True, commit_digest=wrong))
    assert status(stub, upload_id) == 4000
    committed = stub.Commit(pb.CommitRequest(upload_id=upload_id, digest=sha256(data), size=4000))
    assert committed.blob.digest == sha256(data)
    assert read_all(stub, sha256(data)) == data


def test_commit_of_an_already_stored_blob_drops_the_staging(
    stub: blob_pb2_grpc.BlobServiceStub,
) -> None:
    data = unique(2048)
    stub.Put(pb.PutRequest(data=data))
    upload_id = uid()
    stub.Write(write_requests(upload_id, data))
    committed = stub.Commit(pb.CommitRequest(upload_id=upload_id, digest=sha256(data)))
    assert committed.already_existed and committed.blob.size == 2048
    assert status(stub, upload_id) is None
    assert read_all(stub, sha256(data)) == data
    # still verified first: wrong bytes under an existing digest are refused
    liar = uid()
    stub.Write(write_requests(liar, unique(2048)))
    with refused(Code.INVALID_ARGUMENT, Reason.DIGEST_INVALID):
        stub.Commit(pb.CommitRequest(upload_id=liar, digest=sha256(data)))


def test_abort_drops_the_staging(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    upload_id = uid()
    stub.Write(write_requests(upload_id, b"abc"))
    stub.Abort(pb.AbortRequest(upload_id=upload_id))
    assert status(stub, upload_id) is None
    stub.Abort(pb.AbortRequest(upload_id=upload_id))
    # the id can start over, from scratch
    data = unique(10)
    assert stub.Write(write_requests(upload_id, data)).size == 10
    assert stub.Commit(pb.CommitRequest(upload_id=upload_id)).blob.digest == sha256(data)


# --- List -------------------------------------------------------------------------------------


def list_all(stub: blob_pb2_grpc.BlobServiceStub, page_size: int) -> list[pb.Descriptor]:
    found: list[pb.Descriptor] = []
    token = ""
    while True:
        page = stub.List(pb.ListRequest(page_size=page_size, page_token=token))
        assert len(page.blobs) <= (page_size or 100)
        found.extend(page.blobs)
        token = page.next_page_token
        if not token:
            return found


def test_list_pages_in_stable_order(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    mine = {stub.Put(pb.PutRequest(data=unique(i + 1))).blob.digest: i + 1 for i in range(7)}
    mine[stub.Put(pb.PutRequest(data=b"x512", digest=sha512(b"x512"))).blob.digest] = 4
    everything = list_all(stub, 0)
    digests = [d.digest for d in everything]
    assert digests == sorted(digests) and len(set(digests)) == len(digests)
    sizes = {d.digest: d.size for d in everything}
    assert {d: sizes[d] for d in mine} == mine
    for page_size in (1, 2, 3, 1000):
        assert [d.digest for d in list_all(stub, page_size)] == digests
    last = stub.List(pb.ListRequest(page_size=len(digests)))
    assert len(last.blobs) == len(digests) and last.next_page_token == ""


@pytest.mark.parametrize("page_size", [-1, 1001])
def test_list_refuses_bad_page_sizes(stub: blob_pb2_grpc.BlobServiceStub, page_size: int) -> None:
    with refused(Code.INVALID_ARGUMENT, Reason.PAGINATION_INVALID):
        stub.List(pb.ListRequest(page_size=page_size))


@pytest.mark.parametrize("token", ["garbage!", "c2hhMjU2Onh5eg", "=", "\u00ff"])
def test_list_refuses_bad_page_tokens(stub: blob_pb2_grpc.BlobServiceStub, token: str) -> None:
    with refused(Code.INVALID_ARGUMENT, Reason.PAGINATION_INVALID):
        stub.List(pb.ListRequest(page_token=token))


# --- concurrency ------------------------------------------------------------------------------


class HeldStream:
    """A Write stream that sends its first message and then waits until released."""

    def __init__(self, upload_id: str, first: bytes, rest: bytes, offset: int = 0) -> None:
        self.sent_first = threading.Event()
        self.release = threading.Event()
        self.upload_id, self.first, self.rest, self.offset = upload_id, first, rest, offset

    def __iter__(self) -> Iterator[pb.WriteRequest]:
        yield pb.WriteRequest(upload_id=self.upload_id, offset=self.offset, data=self.first)
        self.sent_first.set()
        self.release.wait(30)
        yield pb.WriteRequest(data=self.rest)


def wait_for_size(
    stub: blob_pb2_grpc.BlobServiceStub, upload_id: str, size: int, at_least: bool = False
) -> None:
    for _ in range(1000):
        staged = status(stub, upload_id)
        if staged == size or (at_least and staged is not None and staged >= size):
            return
        time.sleep(0.01)
    raise AssertionError(f"upload {upload_id} never reached {size} bytes")


def test_a_second_writer_on_the_same_upload_is_refused(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    upload_id = uid()
    first, rest = unique(1000), unique(1000)
    held = HeldStream(upload_id, first, rest)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(stub.Write, iter(held))
        assert held.sent_first.wait(10)
        wait_for_size(stub, upload_id, 1000)
        with refused(Code.ABORTED, Reason.BLOB_UPLOAD_INVALID):
            stub.Write(write_requests(upload_id, b"intruder", offset=1000))
        with refused(Code.ABORTED, Reason.BLOB_UPLOAD_INVALID):
            stub.Commit(pb.CommitRequest(upload_id=upload_id))
        with refused(Code.ABORTED, Reason.BLOB_UPLOAD_INVALID):
            stub.Abort(pb.AbortRequest(upload_id=upload_id))
        assert status(stub, upload_id) == 1000  # readable while held
        held.release.set()
        assert pending.result(10).size == 2000
    committed = stub.Commit(pb.CommitRequest(upload_id=upload_id, digest=sha256(first + rest)))
    assert read_all(stub, committed.blob.digest) == first + rest


def test_concurrent_commits_of_the_same_blob_leave_one_copy(blobsvc: ServiceProcess) -> None:
    data = unique(MiB + 3)
    n = 8
    ids = [uid() for _ in range(n)]

    def upload(upload_id: str) -> pb.CommitResponse:
        with blobsvc.channel() as channel:
            stub = blob_pb2_grpc.BlobServiceStub(channel)
            stub.Write(write_requests(upload_id, data, chunk=256 * 1024))
            return stub.Commit(pb.CommitRequest(upload_id=upload_id, digest=sha256(data)))

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(upload, ids))
    assert all(r.blob.digest == sha256(data) and r.blob.size == len(data) for r in results)
    assert sum(not r.already_existed for r in results) == 1
    with blobsvc.channel() as channel:
        stub = blob_pb2_grpc.BlobServiceStub(channel)
        assert read_all(stub, sha256(data)) == data
        assert all(status(stub, i) is None for i in ids)
    if blobsvc.storage == "filesystem":  # type: ignore[attr-defined]
        root: Path = blobsvc.data  # type: ignore[attr-defined]
        hexpart = sha256(data).split(":")[1]
        copies = [p for p in root.rglob("*") if p.is_file() and p.read_bytes() == data]
        assert copies == [root / "blobs" / "sha256" / hexpart[:2] / hexpart]
        assert not any((root / "uploads").joinpath(i).exists() for i in ids)


def test_filesystem_layout_and_nothing_outside_the_root(blobsvc: ServiceProcess) -> None:
    if blobsvc.storage != "filesystem":  # type: ignore[attr-defined]
        pytest.skip("filesystem layout")
    root: Path = blobsvc.data  # type: ignore[attr-defined]
    data = unique(100)
    with blobsvc.channel() as channel:
        stub = blob_pb2_grpc.BlobServiceStub(channel)
        upload_id = uid()
        stub.Write(write_requests(upload_id, data[:50]))
        assert (root / "uploads" / upload_id / "data").read_bytes() == data[:50]
        stub.Write(write_requests(upload_id, data[50:], offset=50, commit=True))
        hexpart = sha256(data).split(":")[1]
        assert (root / "blobs" / "sha256" / hexpart[:2] / hexpart).read_bytes() == data
        assert not (root / "uploads" / upload_id).exists()
        with refused(Code.INVALID_ARGUMENT, Reason.BLOB_UPLOAD_INVALID):
            stub.Write(write_requests("..", b"escape"))
    outside = [p for p in root.parent.iterdir() if p.name not in (root.name,)]
    assert not any("escape" in p.name for p in outside)
    assert all(
        p.is_relative_to(root / "blobs")
        or p.is_relative_to(root / "uploads")
        or p.is_relative_to(root / "tmp")
        for p in root.rglob("*")
    )


# --- the raw Write path (data messages are not parsed with protobuf) -----------------------


def test_data_messages_of_another_shape_are_parsed(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    """Following messages that set other fields than data take the protobuf path: their data
    counts, the rest is ignored."""
    upload_id = uid()
    parts = [unique(1000), unique(2000), b"", unique(10)]
    requests = [pb.WriteRequest(upload_id=upload_id, data=parts[0])]
    requests += [pb.WriteRequest(upload_id="ignored", offset=99, data=p) for p in parts[1:]]
    assert stub.Write(iter(requests)).size == 3010
    committed = stub.Commit(pb.CommitRequest(upload_id=upload_id, digest=sha256(b"".join(parts))))
    assert committed.blob.size == 3010


def test_a_malformed_data_message_is_refused(blobsvc: ServiceProcess) -> None:
    upload_id = uid()
    with blobsvc.channel() as channel:
        raw_write = channel.stream_unary(
            "/linkedblob.blob.v1.BlobService/Write",
            request_serializer=None,
            response_deserializer=pb.WriteResponse.FromString,
        )
        first = pb.WriteRequest(upload_id=upload_id, data=b"good").SerializeToString()
        with refused(Code.INVALID_ARGUMENT, Reason.BLOB_UPLOAD_INVALID):
            raw_write(iter([first, b"\x1a\x05abc"]))  # says 5 bytes, has 3
        with refused(Code.INVALID_ARGUMENT, Reason.BLOB_UPLOAD_INVALID):
            raw_write(iter([b"\xff\xff\xff"]))
        stub = blob_pb2_grpc.BlobServiceStub(channel)
        assert status(stub, upload_id) == 4
