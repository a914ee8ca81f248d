"""blobsvc end to end, stored blobs: Stat, Put, Read, FindMissing, Delete and List."""

from __future__ import annotations

import pytest

from linkedblob.blob.v1 import blob_pb2 as pb
from linkedblob.blob.v1 import blob_pb2_grpc
from linkedblob.config import MAX_CHUNK_BYTES, STREAM_CHUNK_BYTES
from linkedblob.digests import EMPTY
from linkedblob.errors import Reason, error_info
from tests.blobsvc_api_helpers import (
    Code,
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
    write_requests,
)

# pytest finds fixtures by name in the test module: these are the module's.
FIXTURES = (blobsvc, stub)


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


@pytest.mark.parametrize("page_size", [-1, -(2**31)])
def test_list_refuses_bad_page_sizes(stub: blob_pb2_grpc.BlobServiceStub, page_size: int) -> None:
    with refused(Code.INVALID_ARGUMENT, Reason.PAGINATION_INVALID):
        stub.List(pb.ListRequest(page_size=page_size))


@pytest.mark.parametrize("token", ["garbage!", "c2hhMjU2Onh5eg", "=", "\u00ff"])
def test_list_refuses_bad_page_tokens(stub: blob_pb2_grpc.BlobServiceStub, token: str) -> None:
    with refused(Code.INVALID_ARGUMENT, Reason.PAGINATION_INVALID):
        stub.List(pb.ListRequest(page_token=token))
