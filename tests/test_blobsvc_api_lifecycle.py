"""blobsvc end to end, what the data lifecycle needs: ListUploads (paged, with bad input
refused), UploadStatus.updated_at, and WriteResponse.staged_digest (from the running hash, after
a resumed upload, and re-read after a restart). Grants for ListUploads: test_blobsvc_grants.py."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from linkedblob.blob.v1 import blob_pb2 as pb
from linkedblob.blob.v1 import blob_pb2_grpc
from linkedblob.errors import Reason
from tests.blobsvc_api_helpers import (
    Code,
    HeldStream,
    MiB,
    blobsvc,
    refused,
    sha256,
    sha512,
    status,
    stub,
    uid,
    unique,
    wait_for_size,
    write_requests,
)
from tests.services import ServiceProcess, running

# pytest finds fixtures by name in the test module: these are the module's.
FIXTURES = (blobsvc, stub)


def list_all(stub: blob_pb2_grpc.BlobServiceStub, page_size: int) -> list[pb.StagedUpload]:
    """Every staging area, page by page (each page at most ``page_size``)."""
    found: list[pb.StagedUpload] = []
    token = ""
    for _ in range(10_000):
        page = stub.ListUploads(pb.ListUploadsRequest(page_size=page_size, page_token=token))
        assert len(page.uploads) <= page_size
        found.extend(page.uploads)
        token = page.next_page_token
        if not token:
            return found
    raise AssertionError("ListUploads never ended")


def rehashes(svc: ServiceProcess) -> int:
    return sum('"re-hashing staged bytes"' in line for line in svc.output)


def seconds(ts: object) -> float:
    return ts.ToNanoseconds() / 1e9  # type: ignore[attr-defined]


# --- ListUploads ------------------------------------------------------------------------------


def test_list_uploads_pages_in_upload_id_order(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    before = time.time() - 1  # a filesystem's clock may be coarser than time.time()
    sizes = {f"list-{uid()}": n for n in range(7)}
    for upload_id, size in sizes.items():
        stub.Write(write_requests(upload_id, unique(size)))
    everything = list_all(stub, 1000)
    ids = [u.upload_id for u in everything]
    assert ids == sorted(ids)
    listed = {u.upload_id: u for u in everything}
    assert {i: listed[i].size for i in sizes} == sizes
    assert all(before <= seconds(listed[i].updated_at) <= time.time() + 1 for i in sizes)
    for page_size in (1, 2, 3):
        assert list_all(stub, page_size) == everything
    assert len(stub.ListUploads(pb.ListUploadsRequest()).uploads) == min(len(everything), 100)
    # committed and aborted uploads are gone from the list
    done, dropped = sorted(sizes)[2:4]
    stub.Commit(pb.CommitRequest(upload_id=done))
    stub.Abort(pb.AbortRequest(upload_id=dropped))
    remaining = {u.upload_id for u in list_all(stub, 2)}
    assert set(sizes) - remaining == {done, dropped}


def test_list_uploads_lists_a_held_upload_without_waiting(
    stub: blob_pb2_grpc.BlobServiceStub,
) -> None:
    """An upload being written is listed as it stands: listing takes no upload's lock."""
    upload_id = f"held-{uid()}"
    held = HeldStream(upload_id, b"a" * 1000, b"b" * 24)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(stub.Write, iter(held))
        try:
            assert held.sent_first.wait(10)
            wait_for_size(stub, upload_id, 1000)
            listed = {u.upload_id: u.size for u in list_all(stub, 1000)}
            assert listed[upload_id] == 1000
        finally:
            held.release.set()
        assert pending.result(10).size == 1024


def _token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "request_",
    [
        pb.ListUploadsRequest(page_size=-1),
        pb.ListUploadsRequest(page_token="not a token!"),
        pb.ListUploadsRequest(page_token="x" * 2000),
        pb.ListUploadsRequest(page_token=_token("blobs\n\nsha256:" + "0" * 64)),  # List's kind
        pb.ListUploadsRequest(page_token=_token("uploads\n\n../etc")),  # not an upload id
        pb.ListUploadsRequest(page_token=_token("uploads\nscope\nabc")),
    ],
    ids=["negative-size", "bad-token", "long-token", "foreign", "bad-id", "scope"],
)
def test_list_uploads_refuses_bad_paging(
    stub: blob_pb2_grpc.BlobServiceStub, request_: pb.ListUploadsRequest
) -> None:
    with refused(Code.INVALID_ARGUMENT, Reason.PAGINATION_INVALID):
        stub.ListUploads(request_)


def test_a_list_token_is_refused_by_list_uploads_and_back(
    stub: blob_pb2_grpc.BlobServiceStub,
) -> None:
    for _ in range(2):
        stub.Put(pb.PutRequest(data=unique()))
        stub.Write(write_requests(uid(), b"x"))
    blobs_token = stub.List(pb.ListRequest(page_size=1)).next_page_token
    uploads_token = stub.ListUploads(pb.ListUploadsRequest(page_size=1)).next_page_token
    assert blobs_token and uploads_token
    with refused(Code.INVALID_ARGUMENT, Reason.PAGINATION_INVALID):
        stub.ListUploads(pb.ListUploadsRequest(page_token=blobs_token))
    with refused(Code.INVALID_ARGUMENT, Reason.PAGINATION_INVALID):
        stub.List(pb.ListRequest(page_token=uploads_token))


# --- UploadStatus.updated_at ------------------------------------------------------------------


def test_upload_status_updated_at_moves_with_writes(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    upload_id = uid()
    before = time.time() - 1
    stub.Write(write_requests(upload_id, b"abc"))
    first = stub.UploadStatus(pb.UploadStatusRequest(upload_id=upload_id))
    assert first.size == 3 and before <= seconds(first.updated_at) <= time.time() + 1
    time.sleep(0.05)  # beyond a coarse filesystem clock's tick
    same = stub.UploadStatus(pb.UploadStatusRequest(upload_id=upload_id))
    assert same.updated_at == first.updated_at  # asking does not move it
    stub.Write(write_requests(upload_id, b"defg", offset=3))
    second = stub.UploadStatus(pb.UploadStatusRequest(upload_id=upload_id))
    assert second.size == 7 and seconds(second.updated_at) > seconds(first.updated_at)
    listed = {u.upload_id: u for u in list_all(stub, 1000)}[upload_id]
    assert (listed.size, listed.updated_at) == (second.size, second.updated_at)
    time.sleep(0.05)
    # a refused write (wrong offset) writes nothing and does not move it
    with refused(Code.OUT_OF_RANGE, Reason.BLOB_UPLOAD_INVALID):
        stub.Write(write_requests(upload_id, b"x", offset=99))
    assert stub.UploadStatus(pb.UploadStatusRequest(upload_id=upload_id)) == second
    with refused(Code.NOT_FOUND, Reason.BLOB_UPLOAD_UNKNOWN):
        stub.UploadStatus(pb.UploadStatusRequest(upload_id=uid()))


# --- WriteResponse.staged_digest --------------------------------------------------------------


@pytest.mark.parametrize(("algorithm", "hash_of"), [("sha256", sha256), ("sha512", sha512)])
def test_staged_digest_of_a_fresh_and_a_resumed_upload(
    stub: blob_pb2_grpc.BlobServiceStub, algorithm: str, hash_of: Callable[[bytes], str]
) -> None:
    data = unique(2 * MiB + 333)
    upload_id = uid()
    first = stub.Write(
        write_requests(upload_id, data[:MiB], algorithm=algorithm, want_staged_digest=True)
    )
    assert (first.size, first.staged_digest) == (MiB, hash_of(data[:MiB]))
    assert not first.HasField("blob")
    # resumed in a new stream: the running hash goes on (and was not finalized by the copy)
    second = stub.Write(write_requests(upload_id, data[MiB:], offset=MiB, want_staged_digest=True))
    assert (second.size, second.staged_digest) == (len(data), hash_of(data))
    committed = stub.Commit(pb.CommitRequest(upload_id=upload_id, digest=hash_of(data)))
    assert committed.blob.size == len(data)


def test_no_staged_digest_unless_asked(stub: blob_pb2_grpc.BlobServiceStub) -> None:
    written = stub.Write(write_requests(uid(), unique(1000)))
    assert written.size == 1000 and written.staged_digest == ""


def test_staged_digest_of_nothing_and_none_with_commit(
    stub: blob_pb2_grpc.BlobServiceStub,
) -> None:
    empty = stub.Write(write_requests(uid(), b"", want_staged_digest=True))
    assert (empty.size, empty.staged_digest) == (0, sha256(b""))
    data = unique(1000)
    committed = stub.Write(write_requests(uid(), data, commit=True))
    assert committed.blob.digest == sha256(data) and committed.staged_digest == ""


def test_staged_digest_after_a_restart_rereads_the_bytes(tmp_path: Path) -> None:
    data = unique(3 * MiB + 17)
    upload_id = uid()
    with (
        running("blob", "--data", str(tmp_path), "--log-level", "WARNING") as first,
        first.channel() as channel,
    ):
        stub = blob_pb2_grpc.BlobServiceStub(channel)
        written = stub.Write(
            write_requests(upload_id, data[:MiB], algorithm="sha512", want_staged_digest=True)
        )
        assert written.staged_digest == sha512(data[:MiB])
        updated_at = stub.UploadStatus(pb.UploadStatusRequest(upload_id=upload_id)).updated_at
    with (
        running("blob", "--data", str(tmp_path)) as second,
        second.channel() as channel,
    ):
        stub = blob_pb2_grpc.BlobServiceStub(channel)
        listed = stub.ListUploads(pb.ListUploadsRequest()).uploads
        assert [(u.upload_id, u.size, u.updated_at) for u in listed] == [
            (upload_id, MiB, updated_at)
        ]
        # no running hash survived: the staged digest is the re-read bytes' (with the
        # upload's algorithm, not the one this stream names)
        written = stub.Write(
            write_requests(
                upload_id, data[MiB:], offset=MiB, algorithm="sha256", want_staged_digest=True
            )
        )
        assert written.staged_digest == sha512(data)
        assert rehashes(second) == 1
        assert status(stub, upload_id) == len(data)
        committed = stub.Commit(pb.CommitRequest(upload_id=upload_id, digest=sha512(data)))
        assert committed.blob.size == len(data)
        assert rehashes(second) == 1  # the hash re-read for the staged digest was kept


def test_an_unknown_upload_id_in_a_resumed_write_has_no_staged_digest(
    stub: blob_pb2_grpc.BlobServiceStub,
) -> None:
    with refused(Code.NOT_FOUND, Reason.BLOB_UPLOAD_UNKNOWN):
        stub.Write(write_requests(uid(), b"abc", offset=3, want_staged_digest=True))
