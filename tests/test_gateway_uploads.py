"""End to end through a real gateway on real blobsvc and linksvc processes (SQLite and
PostgreSQL): the resumable upload (StartUpload, WriteUpload, GetUpload, CommitUpload,
CancelUpload) in the OCI conformance suite's scenarios, and uploads bound to their repository.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Iterator

import grpc
import pytest

from linkedblob.config import MAX_CHUNK_BYTES, MiB
from linkedblob.v1 import registry_pb2 as pb
from linkedblob.v1 import registry_pb2_grpc
from tests.stack import DB_KINDS, Stack, registry, rpc_error, running_stack

Code = grpc.StatusCode
Registry = registry_pb2_grpc.RegistryStub


@pytest.fixture(scope="module", params=DB_KINDS)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with running_stack(request.param, tmp_path_factory.mktemp(f"uploads-{request.param}")) as s:
        yield s


@pytest.fixture(scope="module")
def rpc(stack: Stack) -> Registry:
    return registry(stack.address)


def new_repo() -> str:
    return f"uploads/{secrets.token_hex(5)}"


@pytest.fixture
def repo() -> str:
    return new_repo()


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def start(rpc: Registry, repo: str) -> str:
    upload = rpc.StartUpload(pb.StartUploadRequest(repository=repo))
    assert upload.repository == repo and upload.offset == 0 and upload.id
    assert upload.started_at.seconds > 0
    return upload.id


def write(
    rpc: Registry, repo: str, upload_id: str, offset: int, chunks: Iterable[bytes]
) -> pb.Upload:
    def messages() -> Iterator[pb.WriteUploadRequest]:
        yield pb.WriteUploadRequest(repository=repo, upload_id=upload_id, offset=offset)
        for chunk in chunks:
            yield pb.WriteUploadRequest(data=chunk)

    return rpc.WriteUpload(messages())


def offset_of(rpc: Registry, repo: str, upload_id: str) -> int:
    upload = rpc.GetUpload(pb.GetUploadRequest(repository=repo, upload_id=upload_id))
    assert upload.id == upload_id and upload.repository == repo
    return upload.offset


def commit(
    rpc: Registry,
    repo: str,
    upload_id: str,
    digest: str,
    *,
    media_type: str = "",
    data: bytes = b"",
    offset: int = 0,
) -> pb.Descriptor:
    return rpc.CommitUpload(
        pb.CommitUploadRequest(
            repository=repo,
            upload_id=upload_id,
            digest=digest,
            media_type=media_type,
            data=data,
            offset=offset,
        )
    )


def read(rpc: Registry, repo: str, digest: str) -> bytes:
    return b"".join(
        m.data for m in rpc.ReadBlob(pb.ReadBlobRequest(repository=repo, digest=digest))
    )


def assert_stored(rpc: Registry, repo: str, data: bytes, media_type: str = "") -> None:
    digest = digest_of(data)
    want = pb.Descriptor(digest=digest, size=len(data), media_type=media_type)
    assert rpc.StatBlob(pb.StatBlobRequest(repository=repo, digest=digest)) == want
    assert read(rpc, repo, digest) == data


def assert_upload_unknown(
    rpc: Registry, repo: str, upload_id: str, cancelled: bool = False
) -> None:
    """Every use of the upload through ``repo`` is NOT_FOUND / BLOB_UPLOAD_UNKNOWN; except
    cancelling a ``cancelled`` upload again, which is no error (a retried cancel)."""
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        offset_of(rpc, repo, upload_id)
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        write(rpc, repo, upload_id, 0, [b"more"])
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        commit(rpc, repo, upload_id, digest_of(b"more"))
    if cancelled:
        rpc.CancelUpload(pb.CancelUploadRequest(repository=repo, upload_id=upload_id))
        return
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        rpc.CancelUpload(pb.CancelUploadRequest(repository=repo, upload_id=upload_id))


# --- pushing in chunks ---------------------------------------------------------------------------


def test_upload_in_one_chunk(rpc: Registry, repo: str) -> None:
    data = os.urandom(MiB + 17)
    upload_id = start(rpc, repo)
    assert offset_of(rpc, repo, upload_id) == 0  # never written
    done = write(rpc, repo, upload_id, 0, [data[:MiB], data[MiB:]])
    assert (done.id, done.repository, done.offset) == (upload_id, repo, len(data))
    assert offset_of(rpc, repo, upload_id) == len(data)
    desc = commit(rpc, repo, upload_id, digest_of(data), media_type="application/x-tar")
    assert desc == pb.Descriptor(
        digest=digest_of(data), size=len(data), media_type="application/x-tar"
    )
    assert_stored(rpc, repo, data, "application/x-tar")
    # Finished: the upload is gone.
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        offset_of(rpc, repo, upload_id)
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        write(rpc, repo, upload_id, len(data), [b"more"])


def test_upload_in_several_chunks(rpc: Registry, repo: str) -> None:
    chunks = [os.urandom(n) for n in (1000, MiB, 1, 300_000)]
    upload_id = start(rpc, repo)
    offset = 0
    for chunk in chunks:
        upload = write(rpc, repo, upload_id, offset, [chunk])
        offset += len(chunk)
        assert upload.offset == offset == offset_of(rpc, repo, upload_id)
    data = b"".join(chunks)
    assert commit(rpc, repo, upload_id, digest_of(data)).size == len(data)
    assert_stored(rpc, repo, data)


def test_the_last_chunk_given_at_commit(rpc: Registry, repo: str) -> None:
    data = os.urandom(2 * MiB + 3)
    upload_id = start(rpc, repo)
    write(rpc, repo, upload_id, 0, [data[:MiB]])
    desc = commit(rpc, repo, upload_id, digest_of(data), data=data[MiB:], offset=MiB)
    assert desc.size == len(data)
    assert_stored(rpc, repo, data)
    # Or the whole blob at commit, on an upload never written.
    small = os.urandom(5000)
    other = start(rpc, repo)
    assert commit(rpc, repo, other, digest_of(small), data=small).digest == digest_of(small)
    assert_stored(rpc, repo, small)


def test_out_of_order_chunk_is_refused_and_the_upload_resumes(rpc: Registry, repo: str) -> None:
    data = os.urandom(3000)
    upload_id = start(rpc, repo)
    write(rpc, repo, upload_id, 0, [data[:1000]])
    with rpc_error(Code.OUT_OF_RANGE, "BLOB_UPLOAD_INVALID") as err:
        write(rpc, repo, upload_id, 2000, [data[2000:]])  # skips 1000..2000
    assert err.metadata["size"] == "1000"
    assert offset_of(rpc, repo, upload_id) == 1000  # nothing was written
    resume = int(err.metadata["size"])
    write(rpc, repo, upload_id, resume, [data[resume:]])
    assert commit(rpc, repo, upload_id, digest_of(data)).size == 3000
    assert_stored(rpc, repo, data)


def test_a_write_at_an_offset_on_an_upload_never_written(rpc: Registry, repo: str) -> None:
    upload_id = start(rpc, repo)
    with rpc_error(Code.OUT_OF_RANGE, "BLOB_UPLOAD_INVALID") as err:
        write(rpc, repo, upload_id, 5, [b"late"])
    assert err.metadata["size"] == "0"
    with rpc_error(Code.OUT_OF_RANGE, "BLOB_UPLOAD_INVALID") as err:
        commit(rpc, repo, upload_id, digest_of(b"late"), data=b"late", offset=5)
    assert err.metadata["size"] == "0"
    assert offset_of(rpc, repo, upload_id) == 0
    write(rpc, repo, upload_id, 0, [b"on time"])
    assert commit(rpc, repo, upload_id, digest_of(b"on time")).size == 7


def test_a_repeated_chunk_is_refused(rpc: Registry, repo: str) -> None:
    data = os.urandom(2000)
    upload_id = start(rpc, repo)
    write(rpc, repo, upload_id, 0, [data[:1000]])
    with rpc_error(Code.OUT_OF_RANGE, "BLOB_UPLOAD_INVALID") as err:
        write(rpc, repo, upload_id, 0, [data[:1000]])
    assert err.metadata["size"] == "1000"
    write(rpc, repo, upload_id, 1000, [data[1000:]])
    assert commit(rpc, repo, upload_id, digest_of(data)).size == 2000
    assert_stored(rpc, repo, data)


def test_cancel(rpc: Registry, repo: str) -> None:
    data = os.urandom(1000)
    upload_id = start(rpc, repo)
    write(rpc, repo, upload_id, 0, [data])
    rpc.CancelUpload(pb.CancelUploadRequest(repository=repo, upload_id=upload_id))
    assert_upload_unknown(rpc, repo, upload_id, cancelled=True)
    assert_upload_unknown(rpc, new_repo(), upload_id)  # nor through another repository
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):
        rpc.StatBlob(pb.StatBlobRequest(repository=repo, digest=digest_of(data)))


def test_a_digest_mismatch_at_commit_keeps_the_upload(rpc: Registry, repo: str) -> None:
    data = os.urandom(5000)
    wrong = digest_of(os.urandom(5000))
    upload_id = start(rpc, repo)
    write(rpc, repo, upload_id, 0, [data])
    with rpc_error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
        commit(rpc, repo, upload_id, wrong)
    with rpc_error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
        commit(rpc, repo, upload_id, digest_of(data, "sha512")[:-2] + "00")
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):
        rpc.StatBlob(pb.StatBlobRequest(repository=repo, digest=wrong))
    assert offset_of(rpc, repo, upload_id) == 5000  # kept, and committable
    assert commit(rpc, repo, upload_id, digest_of(data)).size == 5000
    assert_stored(rpc, repo, data)


def test_a_digest_mismatch_with_the_last_chunk_at_commit(rpc: Registry, repo: str) -> None:
    data = os.urandom(3000)
    upload_id = start(rpc, repo)
    write(rpc, repo, upload_id, 0, [data[:1000]])
    wrong = digest_of(os.urandom(3000))
    with rpc_error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
        commit(rpc, repo, upload_id, wrong, data=data[1000:], offset=1000)
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):
        rpc.StatBlob(pb.StatBlobRequest(repository=repo, digest=wrong))
    # The upload survives, with whatever blobsvc kept of the last chunk.
    resume = offset_of(rpc, repo, upload_id)
    assert resume in (1000, 3000)
    assert commit(rpc, repo, upload_id, digest_of(data), data=data[resume:], offset=resume)
    assert_stored(rpc, repo, data)


def test_a_retried_commit_is_idempotent(rpc: Registry, repo: str) -> None:
    data = os.urandom(1234)
    upload_id = start(rpc, repo)
    write(rpc, repo, upload_id, 0, [data])
    first = commit(rpc, repo, upload_id, digest_of(data), media_type="text/plain")
    assert commit(rpc, repo, upload_id, digest_of(data), media_type="text/plain") == first
    # ... but only for what it committed.
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        commit(rpc, repo, upload_id, digest_of(os.urandom(10)))


def test_empty_and_sha512_uploads(rpc: Registry) -> None:
    for algorithm in ("sha256", "sha512"):
        repo = new_repo()
        empty = digest_of(b"", algorithm)
        upload_id = start(rpc, repo)
        assert commit(rpc, repo, upload_id, empty) == pb.Descriptor(digest=empty, size=0)
        assert rpc.StatBlob(pb.StatBlobRequest(repository=repo, digest=empty)).size == 0
        # An upload never written is no proof of any other blob.
        other = start(rpc, repo)
        with rpc_error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
            commit(rpc, repo, other, digest_of(os.urandom(8), algorithm))
        data = os.urandom(MiB + 99)
        upload_id = start(rpc, repo)
        write(rpc, repo, upload_id, 0, [data[:MiB]])
        write(rpc, repo, upload_id, MiB, [data[MiB:]])
        digest = digest_of(data, algorithm)
        assert commit(rpc, repo, upload_id, digest) == pb.Descriptor(digest=digest, size=len(data))
        assert read(rpc, repo, digest) == data


def test_a_committed_upload_of_a_stored_blob(rpc: Registry) -> None:
    data = os.urandom(4096)
    first, second = new_repo(), new_repo()
    rpc.PutBlob(pb.PutBlobRequest(repository=first, data=data))
    upload_id = start(rpc, second)
    write(rpc, second, upload_id, 0, [data])
    assert commit(rpc, second, upload_id, digest_of(data)).size == len(data)
    assert_stored(rpc, second, data)


# --- uploads belong to their repository ----------------------------------------------------------


def test_an_upload_cannot_be_used_through_another_repository(rpc: Registry) -> None:
    a, b = new_repo(), new_repo()
    data = os.urandom(2000)
    upload_id = start(rpc, a)
    write(rpc, a, upload_id, 0, [data[:1000]])
    assert_upload_unknown(rpc, b, upload_id)
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        commit(rpc, b, upload_id, digest_of(data), data=data[1000:], offset=1000)
    # Nothing of it changed through b: a carries on.
    assert offset_of(rpc, a, upload_id) == 1000
    write(rpc, a, upload_id, 1000, [data[1000:]])
    commit(rpc, a, upload_id, digest_of(data))
    assert_stored(rpc, a, data)
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):
        rpc.StatBlob(pb.StatBlobRequest(repository=b, digest=digest_of(data)))


# --- bad input -----------------------------------------------------------------------------------


def test_unknown_and_malformed_upload_ids(rpc: Registry, repo: str) -> None:
    for upload_id in ("nope", "x" * 129, "../../etc", "a b"):
        assert_upload_unknown(rpc, repo, upload_id)
    with rpc_error(Code.INVALID_ARGUMENT, "BLOB_UPLOAD_INVALID"):
        offset_of(rpc, repo, "")
    with rpc_error(Code.INVALID_ARGUMENT, "BLOB_UPLOAD_INVALID"):
        rpc.WriteUpload(iter([]))


def test_bad_upload_requests_change_nothing(rpc: Registry, repo: str) -> None:
    upload_id = start(rpc, repo)
    write(rpc, repo, upload_id, 0, [b"abc"])
    with rpc_error(Code.INVALID_ARGUMENT, "BLOB_UPLOAD_INVALID"):
        write(rpc, repo, upload_id, -1, [b"x"])
    with rpc_error(Code.RESOURCE_EXHAUSTED, "SIZE_INVALID"):
        write(rpc, repo, upload_id, 3, [b"ok", os.urandom(MAX_CHUNK_BYTES + 1)])
    with rpc_error(Code.RESOURCE_EXHAUSTED, "SIZE_INVALID"):
        commit(rpc, repo, upload_id, digest_of(b"x"), data=os.urandom(MAX_CHUNK_BYTES + 1))
    with rpc_error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
        commit(rpc, repo, upload_id, "sha256:nope")
    with rpc_error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
        commit(rpc, repo, upload_id, "")
    with rpc_error(Code.INVALID_ARGUMENT, "NAME_INVALID"):
        commit(rpc, repo, upload_id, digest_of(b"abc"), media_type="nonsense")
    with rpc_error(Code.INVALID_ARGUMENT, "NAME_INVALID"):
        offset_of(rpc, "Bad/Name", upload_id)
    # The oversize stream may have delivered "ok" before it was refused; nothing else changed.
    offset = offset_of(rpc, repo, upload_id)
    assert offset in (3, 5)
    data = b"abcok"[:offset]
    assert commit(rpc, repo, upload_id, digest_of(data)).size == offset
