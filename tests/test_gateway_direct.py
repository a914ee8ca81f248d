"""Direct access to blobsvc, end to end on real processes: the gateway checks access through the
link (or the upload session) and hands out blobsvc's address and a grant; blobsvc, sharing the
secret, honours exactly that grant. Without a secret the gateway offers nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from linkedblob import grants
from linkedblob.blob.v1 import blob_pb2, blob_pb2_grpc
from linkedblob.config import MiB
from linkedblob.errors import error_info
from linkedblob.v1 import registry_pb2 as pb
from linkedblob.v1 import registry_pb2_grpc
from tests.services import spawn
from tests.stack import GRANT_SECRET_ENV, Stack, registry, rpc_error, running_stack

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack("sqlite", tmp_path_factory.mktemp("direct")) as s:
        yield s


@pytest.fixture(scope="module")
def rpc(stack: Stack) -> registry_pb2_grpc.RegistryStub:
    return registry(stack.address)


@pytest.fixture(scope="module")
def blobsvc(stack: Stack) -> blob_pb2_grpc.BlobServiceStub:
    return blob_pb2_grpc.BlobServiceStub(stack.blob.channel())


@pytest.fixture
def repo() -> str:
    return f"direct/{secrets.token_hex(5)}"


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def grant(token: str) -> tuple[tuple[str, str]]:
    return ((grants.METADATA_KEY, token),)


def read(blobsvc: blob_pb2_grpc.BlobServiceStub, digest: str, token: str, offset: int = 0) -> bytes:
    request = blob_pb2.ReadRequest(digest=digest, offset=offset)
    return b"".join(m.data for m in blobsvc.Read(request, metadata=grant(token)))


def write(
    blobsvc: blob_pb2_grpc.BlobServiceStub, upload_id: str, offset: int, data: bytes, token: str
) -> int:
    def messages() -> Iterator[blob_pb2.WriteRequest]:
        yield blob_pb2.WriteRequest(upload_id=upload_id, offset=offset)
        for pos in range(0, len(data), MiB):
            yield blob_pb2.WriteRequest(data=data[pos : pos + MiB])

    return blobsvc.Write(messages(), metadata=grant(token)).size


def put(rpc: registry_pb2_grpc.RegistryStub, repo: str, data: bytes) -> pb.Descriptor:
    return rpc.PutBlob(pb.PutBlobRequest(repository=repo, data=data, media_type="a/b"))


# --- reading ----------------------------------------------------------------------------------


def test_locate_then_read_from_blobsvc(
    stack: Stack,
    rpc: registry_pb2_grpc.RegistryStub,
    blobsvc: blob_pb2_grpc.BlobServiceStub,
    repo: str,
) -> None:
    data = os.urandom(MiB + 17)
    desc = put(rpc, repo, data)
    located = rpc.LocateBlob(pb.LocateBlobRequest(repository=repo, digest=desc.digest))
    assert located.blob == desc
    assert located.direct.address == stack.blob.address  # --blob-public-addr defaults to it
    assert located.direct.expires_at.seconds > time.time()
    assert read(blobsvc, desc.digest, located.direct.grant) == data
    assert read(blobsvc, desc.digest, located.direct.grant, offset=MiB) == data[MiB:]
    stat = blobsvc.Stat(
        blob_pb2.StatRequest(digest=desc.digest), metadata=grant(located.direct.grant)
    )
    assert stat.blob.size == len(data)


def test_locate_checks_access_through_the_link(
    rpc: registry_pb2_grpc.RegistryStub, repo: str
) -> None:
    desc = put(rpc, repo, os.urandom(100))
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):
        rpc.LocateBlob(pb.LocateBlobRequest(repository=f"{repo}-other", digest=desc.digest))
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):
        rpc.LocateBlob(pb.LocateBlobRequest(repository=repo, digest=digest_of(b"absent")))
    with rpc_error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
        rpc.LocateBlob(pb.LocateBlobRequest(repository=repo, digest="sha256:nope"))
    with rpc_error(Code.INVALID_ARGUMENT, "NAME_INVALID"):
        rpc.LocateBlob(pb.LocateBlobRequest(repository="Bad Name", digest=desc.digest))


def test_a_read_grant_allows_that_digest_only(
    stack: Stack,
    rpc: registry_pb2_grpc.RegistryStub,
    blobsvc: blob_pb2_grpc.BlobServiceStub,
    repo: str,
) -> None:
    mine = put(rpc, repo, os.urandom(100))
    theirs = put(rpc, f"{repo}-private", os.urandom(100))
    token = rpc.LocateBlob(pb.LocateBlobRequest(repository=repo, digest=mine.digest)).direct.grant
    with rpc_error(Code.PERMISSION_DENIED, "DENIED"):
        read(blobsvc, theirs.digest, token)
    with rpc_error(Code.PERMISSION_DENIED, "DENIED"):
        blobsvc.Stat(blob_pb2.StatRequest(digest=theirs.digest), metadata=grant(token))
    with rpc_error(Code.PERMISSION_DENIED, "DENIED"):
        write(blobsvc, "some-upload", 0, b"x", token)
    with rpc_error(Code.PERMISSION_DENIED, "DENIED"):
        blobsvc.Delete(blob_pb2.DeleteRequest(digest=mine.digest), metadata=grant(token))
    assert read(blobsvc, mine.digest, token) != b""


def test_bad_grants_are_unauthenticated(
    stack: Stack,
    rpc: registry_pb2_grpc.RegistryStub,
    blobsvc: blob_pb2_grpc.BlobServiceStub,
    repo: str,
) -> None:
    desc = put(rpc, repo, os.urandom(100))
    token = rpc.LocateBlob(pb.LocateBlobRequest(repository=repo, digest=desc.digest)).direct.grant
    version, _payload, mac = token.split(".")
    signer = grants.Signer(stack.grant_secret)
    other_payload = signer.sign(grants.READ, digest_of(b"other")).split(".")[1]
    cases: dict[str, tuple[tuple[str, str]] | None] = {
        "no grant": None,
        "empty": grant(""),
        "malformed": grant("not-a-grant"),
        "another secret's": grant(grants.Signer("x" * 32).sign(grants.READ, desc.digest)),
        "payload swapped": grant(f"{version}.{other_payload}.{mac}"),
        "unknown version": grant(f"v9.{token.split('.', 1)[1]}"),
        "expired": grant(signer.sign(grants.READ, desc.digest, ttl=-10)),
    }
    answers = {}
    for name, metadata in cases.items():
        try:
            list(blobsvc.Read(blob_pb2.ReadRequest(digest=desc.digest), metadata=metadata))
            answers[name] = "OK"
        except grpc.RpcError as err:
            info = error_info(err)
            answers[name] = f"{err.code().name}/{info.reason if info else ''}"  # type: ignore[attr-defined]
    assert answers == dict.fromkeys(cases, "UNAUTHENTICATED/UNAUTHORIZED")


# --- uploads ----------------------------------------------------------------------------------


def test_a_direct_upload_end_to_end(
    rpc: registry_pb2_grpc.RegistryStub, blobsvc: blob_pb2_grpc.BlobServiceStub, repo: str
) -> None:
    data = os.urandom(3 * MiB + 5)
    upload = rpc.StartUpload(pb.StartUploadRequest(repository=repo, direct=True))
    assert upload.direct.address and upload.direct.grant
    assert write(blobsvc, upload.id, 0, data[: 2 * MiB], upload.direct.grant) == 2 * MiB
    # Resuming asks for the staged offset and a fresh grant.
    resumed = rpc.GetUpload(pb.GetUploadRequest(repository=repo, upload_id=upload.id, direct=True))
    assert resumed.offset == 2 * MiB and resumed.direct.grant
    assert write(blobsvc, upload.id, resumed.offset, data[2 * MiB :], resumed.direct.grant) == len(
        data
    )
    status = blobsvc.UploadStatus(
        blob_pb2.UploadStatusRequest(upload_id=upload.id), metadata=grant(upload.direct.grant)
    )
    assert status.size == len(data)
    desc = rpc.CommitUpload(
        pb.CommitUploadRequest(
            repository=repo, upload_id=upload.id, digest=digest_of(data), media_type="a/b"
        )
    )
    assert desc == pb.Descriptor(digest=digest_of(data), size=len(data), media_type="a/b")
    assert rpc.StatBlob(pb.StatBlobRequest(repository=repo, digest=desc.digest)) == desc
    got = b"".join(
        m.data for m in rpc.ReadBlob(pb.ReadBlobRequest(repository=repo, digest=desc.digest))
    )
    assert got == data
    # A retried commit answers from the link it made.
    again = rpc.CommitUpload(
        pb.CommitUploadRequest(repository=repo, upload_id=upload.id, digest=digest_of(data))
    )
    assert again == desc


def test_a_direct_upload_with_the_wrong_digest_is_refused(
    rpc: registry_pb2_grpc.RegistryStub, blobsvc: blob_pb2_grpc.BlobServiceStub, repo: str
) -> None:
    data = os.urandom(MiB + 1)
    upload = rpc.StartUpload(pb.StartUploadRequest(repository=repo, direct=True))
    write(blobsvc, upload.id, 0, data, upload.direct.grant)
    with rpc_error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
        rpc.CommitUpload(
            pb.CommitUploadRequest(repository=repo, upload_id=upload.id, digest=digest_of(b"x"))
        )
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):
        rpc.StatBlob(pb.StatBlobRequest(repository=repo, digest=digest_of(data)))
    # The staged bytes are kept: the right digest still commits.
    desc = rpc.CommitUpload(
        pb.CommitUploadRequest(repository=repo, upload_id=upload.id, digest=digest_of(data))
    )
    assert desc.size == len(data)


def test_a_write_grant_allows_that_upload_only(
    rpc: registry_pb2_grpc.RegistryStub, blobsvc: blob_pb2_grpc.BlobServiceStub, repo: str
) -> None:
    mine = rpc.StartUpload(pb.StartUploadRequest(repository=repo, direct=True))
    theirs = rpc.StartUpload(pb.StartUploadRequest(repository=repo, direct=True))
    token = mine.direct.grant
    with rpc_error(Code.PERMISSION_DENIED, "DENIED"):
        write(blobsvc, theirs.id, 0, b"x", token)
    with rpc_error(Code.PERMISSION_DENIED, "DENIED"):
        blobsvc.UploadStatus(
            blob_pb2.UploadStatusRequest(upload_id=theirs.id), metadata=grant(token)
        )
    # Committing is the gateway's (it records and links); a write grant cannot.
    write(blobsvc, mine.id, 0, b"x", token)
    with rpc_error(Code.PERMISSION_DENIED, "DENIED"):
        blobsvc.Commit(
            blob_pb2.CommitRequest(upload_id=mine.id, digest=digest_of(b"x")), metadata=grant(token)
        )
    with rpc_error(Code.PERMISSION_DENIED, "DENIED"):
        blobsvc.Put(blob_pb2.PutRequest(data=b"y"), metadata=grant(token))
    # A grant for another repository's upload is not handed out.
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        rpc.GetUpload(
            pb.GetUploadRequest(repository=f"{repo}-other", upload_id=mine.id, direct=True)
        )


# --- without a secret ---------------------------------------------------------------------------


def test_a_gateway_without_a_secret_offers_no_direct_access(tmp_path: Path) -> None:
    with running_stack("sqlite", tmp_path, direct=False) as plain:
        rpc = registry(plain.address)
        repo = f"direct/{secrets.token_hex(5)}"
        desc = put(rpc, repo, b"hello")
        with rpc_error(Code.FAILED_PRECONDITION, "UNSUPPORTED"):
            rpc.LocateBlob(pb.LocateBlobRequest(repository=repo, digest=desc.digest))
        with rpc_error(Code.FAILED_PRECONDITION, "UNSUPPORTED"):
            rpc.StartUpload(pb.StartUploadRequest(repository=repo, direct=True))
        upload = rpc.StartUpload(pb.StartUploadRequest(repository=repo))
        assert not upload.HasField("direct")
        with rpc_error(Code.FAILED_PRECONDITION, "UNSUPPORTED"):
            rpc.GetUpload(pb.GetUploadRequest(repository=repo, upload_id=upload.id, direct=True))
        assert not rpc.GetUpload(
            pb.GetUploadRequest(repository=repo, upload_id=upload.id)
        ).HasField("direct")
        # Its blobsvc needs no grant.
        blobsvc = blob_pb2_grpc.BlobServiceStub(plain.blob.channel())
        assert blobsvc.Stat(blob_pb2.StatRequest(digest=desc.digest)).blob.size == 5


def test_a_gateway_refuses_a_short_secret() -> None:
    with pytest.raises(RuntimeError, match="at least 16 bytes"):
        spawn("gateway", env={GRANT_SECRET_ENV: "too-short"})


# --- grants bound to state ------------------------------------------------------------------------


@pytest.mark.parametrize("finish", ["commit", "cancel"])
def test_a_write_grant_writes_nothing_once_its_upload_is_finished(
    stack: Stack,
    rpc: registry_pb2_grpc.RegistryStub,
    blobsvc: blob_pb2_grpc.BlobServiceStub,
    repo: str,
    finish: str,
) -> None:
    data = os.urandom(1000)
    upload = rpc.StartUpload(pb.StartUploadRequest(repository=repo, direct=True))
    token = upload.direct.grant
    # The gateway made the staging area when it handed out the grant: nothing staged yet.
    status = blob_pb2.UploadStatusRequest(upload_id=upload.id)
    assert blobsvc.UploadStatus(status, metadata=grant(token)).size == 0
    assert write(blobsvc, upload.id, 0, data, token) == len(data)
    if finish == "commit":
        rpc.CommitUpload(
            pb.CommitUploadRequest(repository=repo, upload_id=upload.id, digest=digest_of(data))
        )
    else:
        rpc.CancelUpload(pb.CancelUploadRequest(repository=repo, upload_id=upload.id))
    for offset in (0, len(data)):
        with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
            write(blobsvc, upload.id, offset, b"more", token)
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        blobsvc.UploadStatus(status, metadata=stack.blob_metadata())  # nothing was made


def test_read_grants_are_short_lived(
    stack: Stack, blobsvc: blob_pb2_grpc.BlobServiceStub, repo: str
) -> None:
    """--read-grant-ttl: a deleted link stays readable through a read grant already issued,
    until it expires (checked when a Read starts); write grants keep --grant-ttl."""
    gateway = stack.another_gateway(enable_delete=True, args=("--read-grant-ttl", "2s"))
    rpc = registry(gateway.address)
    data = os.urandom(1000)
    desc = put(rpc, repo, data)
    located = rpc.LocateBlob(pb.LocateBlobRequest(repository=repo, digest=desc.digest))
    assert located.direct.expires_at.seconds <= time.time() + 3
    upload = rpc.StartUpload(pb.StartUploadRequest(repository=repo, direct=True))
    assert upload.direct.expires_at.seconds >= time.time() + 200  # --grant-ttl: 300 s
    rpc.DeleteBlob(pb.DeleteBlobRequest(repository=repo, digest=desc.digest))
    assert read(blobsvc, desc.digest, located.direct.grant) == data  # still, until it expires
    deadline = time.time() + 10
    while time.time() <= located.direct.expires_at.seconds + 1:
        assert time.time() < deadline
        time.sleep(0.2)
    with rpc_error(Code.UNAUTHENTICATED, "UNAUTHORIZED"):
        read(blobsvc, desc.digest, located.direct.grant)


def test_a_gateway_signs_with_the_first_secret_of_its_file(
    stack: Stack, blobsvc: blob_pb2_grpc.BlobServiceStub, repo: str, tmp_path: Path
) -> None:
    secret_file = tmp_path / "grant-secrets"
    secret_file.write_text(f"{stack.grant_secret}\n{'o' * 32}\n")
    gateway = stack.another_gateway(
        enable_delete=False, args=("--grant-secret-file", str(secret_file))
    )
    rpc = registry(gateway.address)
    data = os.urandom(100)
    desc = put(rpc, repo, data)  # its own blobsvc calls carry grants blobsvc accepts
    token = rpc.LocateBlob(pb.LocateBlobRequest(repository=repo, digest=desc.digest)).direct.grant
    assert grants.Signer(stack.grant_secret).verify(token).subject == desc.digest
    assert read(blobsvc, desc.digest, token) == data


def test_the_collector_signs_with_its_secret_file(stack: Stack, tmp_path: Path) -> None:
    def gc(secrets_text: str) -> subprocess.CompletedProcess[str]:
        secret_file = tmp_path / "grant-secrets"
        secret_file.write_text(secrets_text)
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "linkedblob.cli",
                "gc",
                "--json",
                "--dry-run",
                "--link-addr",
                stack.link.address,
                "--blob-addr",
                stack.blob.address,
                "--grant-secret-file",
                str(secret_file),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, GRANT_SECRET_ENV: ""},
        )

    ok = gc(f"{stack.grant_secret}\n{'n' * 32}\n")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["outcome"] == "ok"
    refused = gc(f"{'w' * 32}\n{stack.grant_secret}\n")  # signs with one blobsvc does not know
    assert refused.returncode != 0
    assert "UNAUTHENTICATED" in refused.stdout + refused.stderr
