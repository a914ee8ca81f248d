"""blobsvc end to end, uploads (Write, Commit, Abort), concurrent writers, the raw Write path."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from linkedblob.blob.v1 import blob_pb2 as pb
from linkedblob.blob.v1 import blob_pb2_grpc
from linkedblob.config import MAX_CHUNK_BYTES
from linkedblob.errors import Reason, error_info
from tests.blobsvc_api_helpers import (
    Code,
    HeldStream,
    MiB,
    blobsvc,
    read_all,
    refused,
    sha256,
    sha512,
    status,
    stored,
    stub,
    uid,
    unique,
    wait_for_size,
    write_requests,
)
from tests.services import ServiceProcess

# pytest finds fixtures by name in the test module: these are the module's.
FIXTURES = (blobsvc, stub)


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


# --- concurrency ------------------------------------------------------------------------------


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
        with refused(Code.INVALID_ARGUMENT, Reason.REQUEST_MALFORMED):
            raw_write(iter([first, b"\x1a\x05abc"]))  # says 5 bytes, has 3
        with refused(Code.INVALID_ARGUMENT, Reason.REQUEST_MALFORMED):
            raw_write(iter([b"\xff\xff\xff"]))
        stub = blob_pb2_grpc.BlobServiceStub(channel)
        assert status(stub, upload_id) == 4
