"""blobsvc's grant enforcement (``--grant-secret``, env LINKEDBLOB_GRANT_SECRET) against a real
server: every call without a grant that allows it is refused with its code and reason and
changes nothing on disk; the right grants work; without a secret no grant is needed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from linkedblob.blob.v1 import blob_pb2 as pb
from linkedblob.blob.v1 import blob_pb2_grpc
from linkedblob.errors import error_info
from linkedblob.grants import INTERNAL, METADATA_KEY, READ, WRITE, Signer
from tests.blobsvc_api_helpers import read_all, refused, write_requests
from tests.services import ServiceProcess, running

Code = grpc.StatusCode
SECRET = "blobsvc-test-secret-" + "0123456789abcdef"
signer = Signer(SECRET)
Metadata = tuple[tuple[str, str], ...]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def grant(action: str, subject: str = "", ttl: float = 60, by: Signer = signer) -> Metadata:
    return ((METADATA_KEY, by.sign(action, subject, ttl)),)


# Signed once, at import: it must outlive the whole test session, not only this module's run.
INTERNAL_GRANT = grant(INTERNAL, ttl=24 * 3600)


@pytest.fixture(scope="module")
def blobsvc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    data = tmp_path_factory.mktemp("blobs")
    env = {"LINKEDBLOB_GRANT_SECRET": SECRET}
    with running("blob", "--data", str(data), "--log-level", "WARNING", env=env) as svc:
        svc.data = data  # type: ignore[attr-defined]
        yield svc


@pytest.fixture
def stub(blobsvc: ServiceProcess) -> Iterator[blob_pb2_grpc.BlobServiceStub]:
    with blobsvc.channel() as channel:
        yield blob_pb2_grpc.BlobServiceStub(channel)


@dataclass
class World:
    """A stored blob and a staged upload to aim calls at, and names of things not there."""

    stored: bytes
    digest: str
    upload_id: str  # staged: 3 bytes
    new_upload_id: str  # unknown
    new_data: bytes  # not stored


@pytest.fixture
def world(stub: blob_pb2_grpc.BlobServiceStub) -> World:
    stored = os.urandom(100)
    stub.Put(pb.PutRequest(data=stored), metadata=INTERNAL_GRANT)
    upload_id = "g-" + os.urandom(6).hex()
    stub.Write(write_requests(upload_id, b"abc"), metadata=INTERNAL_GRANT)
    return World(stored, sha256(stored), upload_id, "g-" + os.urandom(6).hex(), os.urandom(50))


# Every call, aimed at the world, with the (action, subject) a narrow grant for it names.
Call = Callable[[blob_pb2_grpc.BlobServiceStub, World, Metadata], object]


def _stat(s: blob_pb2_grpc.BlobServiceStub, w: World, md: Metadata) -> object:
    return s.Stat(pb.StatRequest(digest=w.digest), metadata=md)


def _read(s: blob_pb2_grpc.BlobServiceStub, w: World, md: Metadata) -> object:
    return b"".join(m.data for m in s.Read(pb.ReadRequest(digest=w.digest), metadata=md))


def _write(s: blob_pb2_grpc.BlobServiceStub, w: World, md: Metadata) -> object:
    return s.Write(write_requests(w.upload_id, b"defg", offset=3, commit=True), metadata=md)


def _write_new(s: blob_pb2_grpc.BlobServiceStub, w: World, md: Metadata) -> object:
    return s.Write(write_requests(w.new_upload_id, b"fresh"), metadata=md)


def _upload_status(s: blob_pb2_grpc.BlobServiceStub, w: World, md: Metadata) -> object:
    return s.UploadStatus(pb.UploadStatusRequest(upload_id=w.upload_id), metadata=md)


def _commit(s: blob_pb2_grpc.BlobServiceStub, w: World, md: Metadata) -> object:
    return s.Commit(pb.CommitRequest(upload_id=w.upload_id, digest=sha256(b"abc")), metadata=md)


def _abort(s: blob_pb2_grpc.BlobServiceStub, w: World, md: Metadata) -> object:
    return s.Abort(pb.AbortRequest(upload_id=w.upload_id), metadata=md)


def _put(s: blob_pb2_grpc.BlobServiceStub, w: World, md: Metadata) -> object:
    return s.Put(pb.PutRequest(data=w.new_data), metadata=md)


def _delete(s: blob_pb2_grpc.BlobServiceStub, w: World, md: Metadata) -> object:
    return s.Delete(pb.DeleteRequest(digest=w.digest), metadata=md)


def _list(s: blob_pb2_grpc.BlobServiceStub, w: World, md: Metadata) -> object:
    return s.List(pb.ListRequest(), metadata=md)


def _list_uploads(s: blob_pb2_grpc.BlobServiceStub, w: World, md: Metadata) -> object:
    return s.ListUploads(pb.ListUploadsRequest(), metadata=md)


def _find_missing(s: blob_pb2_grpc.BlobServiceStub, w: World, md: Metadata) -> object:
    return s.FindMissing(pb.FindMissingRequest(digests=[w.digest]), metadata=md)


# name: (call, the narrow grant that allows it: (action, subject of the world) or None)
CALLS: dict[str, tuple[Call, Callable[[World], tuple[str, str]] | None]] = {
    "Stat": (_stat, lambda w: (READ, w.digest)),
    "Read": (_read, lambda w: (READ, w.digest)),
    "Write": (_write, lambda w: (WRITE, w.upload_id)),
    "Write-new": (_write_new, lambda w: (WRITE, w.new_upload_id)),
    "UploadStatus": (_upload_status, lambda w: (WRITE, w.upload_id)),
    "Commit": (_commit, None),
    "Abort": (_abort, None),
    "Put": (_put, None),
    "Delete": (_delete, None),
    "List": (_list, None),
    "ListUploads": (_list_uploads, None),
    "FindMissing": (_find_missing, None),
}


def _unauthenticated_grants(w: World) -> dict[str, Metadata]:
    return {
        "none": (),
        "empty": ((METADATA_KEY, ""),),
        "garbage": ((METADATA_KEY, "v1.not.a-grant"),),
        "forged": grant(INTERNAL, by=Signer("another-secret-0123456789")),
        "expired-internal": grant(INTERNAL, ttl=-60),
        "expired-read": grant(READ, w.digest, ttl=-60),
        "expired-write": grant(WRITE, w.upload_id, ttl=-60),
        "tampered": ((METADATA_KEY, signer.sign(READ, w.digest).replace("v1.", "v2.", 1)),),
    }


def _wrong_scope_grants(w: World, narrow: tuple[str, str] | None) -> dict[str, Metadata]:
    """Valid grants that do not allow the call (the narrow one allows it, if any)."""
    candidates = {
        "read-this-digest": (READ, w.digest),
        "read-other-digest": (READ, sha256(b"other")),
        "read-named-like-the-upload": (READ, w.upload_id),
        "write-this-upload": (WRITE, w.upload_id),
        "write-new-upload": (WRITE, w.new_upload_id),
        "write-named-like-the-digest": (WRITE, w.digest),
    }
    return {name: grant(*scope) for name, scope in candidates.items() if scope != narrow}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under the store's root with its content."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("name", CALLS)
def test_every_call_without_an_allowing_grant_is_refused_and_changes_nothing(
    blobsvc: ServiceProcess, stub: blob_pb2_grpc.BlobServiceStub, world: World, name: str
) -> None:
    call, narrow = CALLS[name]
    narrow_scope = narrow(world) if narrow else None
    before = snapshot(blobsvc.data)  # type: ignore[attr-defined]
    expected = [
        *(
            (case, md, Code.UNAUTHENTICATED, "UNAUTHORIZED")
            for case, md in _unauthenticated_grants(world).items()
        ),
        *(
            (case, md, Code.PERMISSION_DENIED, "DENIED")
            for case, md in _wrong_scope_grants(world, narrow_scope).items()
        ),
    ]
    for case, md, code, reason in expected:
        try:
            with refused(code, reason):
                call(stub, world, md)
        except AssertionError as err:
            raise AssertionError(f"{name} with grant {case!r}: {err}") from err
    assert snapshot(blobsvc.data) == before  # type: ignore[attr-defined]


def test_narrow_grants_allow_their_calls(stub: blob_pb2_grpc.BlobServiceStub, world: World) -> None:
    read = grant(READ, world.digest)
    assert stub.Stat(pb.StatRequest(digest=world.digest), metadata=read).blob.size == 100
    assert read_all_with(stub, world.digest, read) == world.stored
    write = grant(WRITE, world.upload_id)
    assert (
        stub.UploadStatus(pb.UploadStatusRequest(upload_id=world.upload_id), metadata=write).size
        == 3
    )
    response = stub.Write(write_requests(world.upload_id, b"defg", offset=3), metadata=write)
    assert response.size == 7
    # A client's direct upload: written under its write grant, committed by the gateway.
    committed = stub.Commit(
        pb.CommitRequest(upload_id=world.upload_id, digest=sha256(b"abcdefg")),
        metadata=INTERNAL_GRANT,
    )
    assert committed.blob.digest == sha256(b"abcdefg")
    # A new upload: the gateway makes its (empty) staging area when it hands out the grant.
    stub.Write(write_requests(world.new_upload_id, b""), metadata=INTERNAL_GRANT)
    new = grant(WRITE, world.new_upload_id)
    assert stub.Write(write_requests(world.new_upload_id, b"fresh"), metadata=new).size == 5


def test_a_write_grant_creates_no_upload(
    blobsvc: ServiceProcess, stub: blob_pb2_grpc.BlobServiceStub, world: World
) -> None:
    """A write grant only appends to a staging area that exists: for an unknown upload (never
    made, or committed or cancelled since) it is NOT_FOUND and nothing is created."""
    before = snapshot(blobsvc.data)  # type: ignore[attr-defined]
    new = grant(WRITE, world.new_upload_id)
    with refused(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        stub.Write(write_requests(world.new_upload_id, b"fresh"), metadata=new)
    assert snapshot(blobsvc.data) == before  # type: ignore[attr-defined]


@pytest.mark.parametrize("finish", ["commit", "cancel"])
def test_a_write_grant_writes_nothing_after_commit_or_cancel(
    blobsvc: ServiceProcess, stub: blob_pb2_grpc.BlobServiceStub, world: World, finish: str
) -> None:
    write = grant(WRITE, world.upload_id)
    if finish == "commit":
        stub.Commit(
            pb.CommitRequest(upload_id=world.upload_id, digest=sha256(b"abc")),
            metadata=INTERNAL_GRANT,
        )
    else:
        stub.Abort(pb.AbortRequest(upload_id=world.upload_id), metadata=INTERNAL_GRANT)
    before = snapshot(blobsvc.data)  # type: ignore[attr-defined]
    for offset in (0, 3):
        with refused(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
            stub.Write(write_requests(world.upload_id, b"more", offset=offset), metadata=write)
    with refused(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        stub.UploadStatus(pb.UploadStatusRequest(upload_id=world.upload_id), metadata=write)
    assert snapshot(blobsvc.data) == before  # type: ignore[attr-defined]


def test_a_write_grant_stages_but_cannot_commit(
    blobsvc: ServiceProcess, stub: blob_pb2_grpc.BlobServiceStub, world: World
) -> None:
    """A client's write grant lets it stage bytes; storing them as a blob is the gateway's."""
    before = snapshot(blobsvc.data)  # type: ignore[attr-defined]
    with refused(Code.PERMISSION_DENIED, "DENIED"):
        stub.Write(
            write_requests(world.upload_id, b"defg", offset=3, commit=True),
            metadata=grant(WRITE, world.upload_id),
        )
    assert snapshot(blobsvc.data) == before  # type: ignore[attr-defined]
    status = stub.UploadStatus(
        pb.UploadStatusRequest(upload_id=world.upload_id), metadata=INTERNAL_GRANT
    )
    assert status.size == 3


def test_an_internal_grant_allows_every_call(
    stub: blob_pb2_grpc.BlobServiceStub, world: World
) -> None:
    md = INTERNAL_GRANT
    assert stub.Stat(pb.StatRequest(digest=world.digest), metadata=md).blob.size == 100
    assert read_all_with(stub, world.digest, md) == world.stored
    assert (
        stub.UploadStatus(pb.UploadStatusRequest(upload_id=world.upload_id), metadata=md).size == 3
    )
    stub.Write(write_requests(world.upload_id, b"defg", offset=3), metadata=md)
    stub.Commit(pb.CommitRequest(upload_id=world.upload_id, digest=sha256(b"abcdefg")), metadata=md)
    stub.Write(write_requests(world.new_upload_id, b"fresh"), metadata=md)
    stub.Abort(pb.AbortRequest(upload_id=world.new_upload_id), metadata=md)
    put = stub.Put(pb.PutRequest(data=world.new_data), metadata=md)
    listed = {d.digest for d in stub.List(pb.ListRequest(page_size=1000), metadata=md).blobs}
    assert {world.digest, sha256(b"abcdefg"), put.blob.digest} <= listed
    staged = stub.ListUploads(pb.ListUploadsRequest(page_size=1000), metadata=md).uploads
    staged_ids = {u.upload_id for u in staged}
    assert world.new_upload_id not in staged_ids and world.upload_id not in staged_ids
    stub.Write(write_requests(world.new_upload_id, b"fresh"), metadata=md)
    staged = stub.ListUploads(pb.ListUploadsRequest(page_size=1000), metadata=md).uploads
    assert {u.upload_id: u.size for u in staged}[world.new_upload_id] == 5
    assert stub.Delete(pb.DeleteRequest(digest=world.digest), metadata=md).deleted
    missing = stub.FindMissing(pb.FindMissingRequest(digests=[world.digest]), metadata=md)
    assert list(missing.missing) == [world.digest]


def test_a_write_is_refused_before_its_first_message_without_a_valid_grant(
    stub: blob_pb2_grpc.BlobServiceStub,
) -> None:
    """Authentication does not wait for the request: an empty stream is UNAUTHENTICATED, not
    INVALID_ARGUMENT; with a valid grant it is the empty stream that is refused."""
    with refused(Code.UNAUTHENTICATED, "UNAUTHORIZED"):
        stub.Write(iter([]))
    with refused(Code.INVALID_ARGUMENT, "BLOB_UPLOAD_INVALID"):
        stub.Write(iter([]), metadata=INTERNAL_GRANT)


def test_bad_requests_with_a_valid_grant_keep_their_own_errors(
    stub: blob_pb2_grpc.BlobServiceStub,
) -> None:
    with refused(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
        stub.Stat(pb.StatRequest(digest="sha256:nope"), metadata=INTERNAL_GRANT)
    with refused(Code.INVALID_ARGUMENT, "BLOB_UPLOAD_INVALID"):
        stub.Write(write_requests("../x", b"a"), metadata=INTERNAL_GRANT)
    missing = sha256(b"absent")
    with refused(Code.NOT_FOUND, "BLOB_UNKNOWN"):
        stub.Stat(pb.StatRequest(digest=missing), metadata=grant(READ, missing))


def read_all_with(stub: blob_pb2_grpc.BlobServiceStub, digest: str, md: Metadata) -> bytes:
    return b"".join(m.data for m in stub.Read(pb.ReadRequest(digest=digest), metadata=md))


def test_without_a_secret_no_grant_is_needed(tmp_path: Path) -> None:
    env = {"LINKEDBLOB_GRANT_SECRET": ""}
    with (
        running("blob", "--data", str(tmp_path), "--log-level", "WARNING", env=env) as svc,
        svc.channel() as channel,
    ):
        stub = blob_pb2_grpc.BlobServiceStub(channel)
        digest = stub.Put(pb.PutRequest(data=b"free")).blob.digest
        assert read_all(stub, digest) == b"free"
        # A grant from anyone is ignored, not checked.
        forged = grant(READ, "x", by=Signer("whatever-secret-0123456789"))
        assert stub.Stat(pb.StatRequest(digest=digest), metadata=forged).blob.size == 4


def test_a_short_secret_is_refused_at_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "linkedblob.cli", "serve", "blob", "--port", "0", "--open"],
        env={**os.environ, "LINKEDBLOB_GRANT_SECRET": "short", "LINKEDBLOB_DATA": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--grant-secret" in result.stderr and "16 bytes" in result.stderr


def test_secrets_from_a_file_rotate(tmp_path: Path) -> None:
    """--grant-secret-file: the first line signs, every line verifies, and the file is re-read
    when it changes (as a Kubernetes Secret is updated): a rotation never refuses a grant
    signed by a secret still listed."""
    old, new, gone = ("old-" + "a" * 30, "new-" + "b" * 30, "gone-" + "c" * 30)
    secrets_file = tmp_path / "grant-secrets"
    secrets_file.write_text(f"{old}\n{new}\n")
    data = tmp_path / "data"
    args = ("--data", str(data), "--grant-secret-file", str(secrets_file))
    with running("blob", *args, env={"LINKEDBLOB_GRANT_SECRET": ""}) as svc, svc.channel() as ch:
        stub = blob_pb2_grpc.BlobServiceStub(ch)

        def stat_with(secret: str) -> str:
            metadata = grant(INTERNAL, by=Signer(secret))
            try:
                stub.FindMissing(pb.FindMissingRequest(digests=[]), metadata=metadata)
                return "OK"
            except grpc.RpcError as err:
                return err.code().name  # type: ignore[attr-defined,no-any-return]

        assert [stat_with(s) for s in (old, new, gone)] == ["OK", "OK", "UNAUTHENTICATED"]
        secrets_file.write_text(f"{new}\n")  # the rotation's last step: the old one is dropped
        deadline = time.monotonic() + 10
        while stat_with(old) == "OK":
            assert time.monotonic() < deadline, "the file was not re-read"
            time.sleep(0.1)
        assert [stat_with(s) for s in (old, new, gone)] == [
            "UNAUTHENTICATED",
            "OK",
            "UNAUTHENTICATED",
        ]
        secrets_file.write_text("")  # a broken file keeps the secrets read before
        time.sleep(1.5)
        assert stat_with(new) == "OK"


def test_an_unreadable_secret_file_is_refused_at_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "linkedblob.cli", "serve", "blob", "--port", "0", "--open"],
        env={
            **os.environ,
            "LINKEDBLOB_GRANT_SECRET_FILE": str(tmp_path / "absent"),
            "LINKEDBLOB_DATA": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--grant-secret-file" in result.stderr and str(tmp_path) in result.stderr


def test_a_write_grant_is_checked_on_every_message(
    stub: blob_pb2_grpc.BlobServiceStub, world: World
) -> None:
    """A stream opened within its grant's lifetime does not write past it: the message after
    the expiry ends the stream (grant=expired); what was staged before it stays."""
    write = grant(WRITE, world.upload_id, ttl=1)
    expires = signer.verify(write[0][1]).expires

    def slow() -> Iterator[pb.WriteRequest]:
        yield pb.WriteRequest(upload_id=world.upload_id, offset=3, data=b"d")
        while time.time() <= expires + 0.5:
            time.sleep(0.1)
        yield pb.WriteRequest(data=b"late")

    with refused(Code.UNAUTHENTICATED, "UNAUTHORIZED") as caught:
        stub.Write(slow(), metadata=write)
    info = error_info(caught[0])
    assert info is not None and info.metadata["grant"] == "expired"
    status = stub.UploadStatus(
        pb.UploadStatusRequest(upload_id=world.upload_id), metadata=INTERNAL_GRANT
    )
    assert status.size == 4
