"""A refused PushBlob or CommitUpload leaves no lease, through a real stack (SQLite).

The gateway leases a digest before every commit in blobsvc; before linksvc had ReleaseLease, a
refused call left the lease in ``blob_leases`` for its TTL (10 minutes), so a caller could keep
any digest from garbage collection by failing calls, and a refusal changed something. Each call
here is refused, and then linksvc's SQLite file has no lease row and no other table changed.
A call that succeeds consumes its lease in its link, as before.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections.abc import Iterator

import grpc
import pytest

from linkedblob.v1 import registry_pb2 as pb
from linkedblob.v1 import registry_pb2_grpc
from tests.services import spawn
from tests.stack import Stack, registry, rpc_error, running_stack

Code = grpc.StatusCode
KNOWN = b"a blob the stack knows"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# The second gateway's policy: anyone may push and pull under refused/, nothing else. A digest
# recorded elsewhere is then not linked at once (the caller may not pull it anywhere): it is
# leased and its data read, as a new blob's.
POLICY = """
[[rule]]
anonymous = true
repositories = ["refused/**"]
actions = ["pull", "push"]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("lease-release")
    with running_stack("sqlite", directory, direct=False) as s:
        registry(s.address).PutBlob(pb.PutBlobRequest(repository="known/repo", data=KNOWN))
        policy = directory / "policy.toml"
        policy.write_text(POLICY)
        s.extra.append(
            spawn(
                "gateway",
                "--blob-addr",
                s.blob.address,
                "--link-addr",
                s.link.address,
                "--auth-policy",
                str(policy),
                "--log-level",
                "WARNING",
                open_=False,
            )
        )
        yield s


def gateways(stack: Stack) -> list[str]:
    """The open gateway and the one with the policy."""
    return [stack.address, stack.extra[0].address]


def tables(stack: Stack) -> dict[str, list[tuple[object, ...]]]:
    """Every row of linksvc's tables, read from its SQLite file."""
    path = stack.db_url.removeprefix("sqlite:///")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        names = [
            name
            for (name,) in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {name: sorted(con.execute(f'SELECT * FROM "{name}"').fetchall()) for name in names}
    finally:
        con.close()


def leases(stack: Stack) -> list[tuple[object, ...]]:
    return tables(stack)["blob_leases"]


def push(
    rpc: registry_pb2_grpc.RegistryStub,
    repository: str,
    digest: str,
    size: int | None,
    *chunks: bytes,
) -> pb.Descriptor:
    header = pb.PushBlobRequest.Header(repository=repository, digest=digest, size=size)
    messages = [pb.PushBlobRequest(header=header), *(pb.PushBlobRequest(data=c) for c in chunks)]
    return rpc.PushBlob(iter(messages))


def repo() -> str:
    return f"refused/{secrets.token_hex(4)}"


@pytest.mark.parametrize(
    ("declared", "size", "chunks", "reason"),
    [
        # A known digest with a size of 2 and no data: the open gateway refuses it at the
        # lease (the recorded size differs; no lease is taken); the gateway with the policy
        # leases it, reads the data and refuses that.
        (KNOWN, 2, (), "SIZE_INVALID"),
        (KNOWN, None, (b"xy",), "DIGEST_INVALID"),
        (KNOWN, len(KNOWN), (b"x" * len(KNOWN),), "DIGEST_INVALID"),
        # A digest nobody stored: leased, then the data is refused.
        (b"never stored", 2, (), "SIZE_INVALID"),
        (b"never stored", None, (b"other bytes",), "DIGEST_INVALID"),
        (b"never stored", 11, (b"never stored",), "SIZE_INVALID"),
    ],
    ids=[
        "known-size-2-no-data",
        "known-other-data",
        "known-other-data-of-its-size",
        "new-no-data",
        "new-other-data",
        "new-wrong-size",
    ],
)
def test_a_refused_push_leaves_no_lease(
    stack: Stack, declared: bytes, size: int | None, chunks: tuple[bytes, ...], reason: str
) -> None:
    # The open gateway links a known digest at once, whatever data follows (the caller may
    # pull it): only the other gateway reads and refuses that data.
    known_with_data = declared == KNOWN and bool(chunks)
    for address in gateways(stack)[1:] if known_with_data else gateways(stack):
        rpc = registry(address)
        before = tables(stack)
        with rpc_error(Code.INVALID_ARGUMENT, reason):
            push(rpc, repo(), digest_of(declared), size, *chunks)
        assert leases(stack) == [], address
        assert tables(stack) == before, address


@pytest.mark.parametrize("which", [0, 1], ids=["open", "policy"])
def test_refused_commits_leave_no_lease(stack: Stack, which: int) -> None:
    rpc, repository = registry(gateways(stack)[which]), repo()
    data = b"0123456789"
    upload_id = rpc.StartUpload(pb.StartUploadRequest(repository=repository)).id
    rpc.WriteUpload(
        iter([pb.WriteUploadRequest(repository=repository, upload_id=upload_id, data=data[:4])])
    )
    before = tables(stack)

    def commit(**fields: object) -> None:
        request = {"repository": repository, "upload_id": upload_id, "digest": digest_of(data)}
        rpc.CommitUpload(pb.CommitUploadRequest(**{**request, **fields}))  # type: ignore[arg-type]

    # The last chunk at the wrong offset.
    with rpc_error(Code.OUT_OF_RANGE, "BLOB_UPLOAD_INVALID") as raised:
        commit(data=data[4:], offset=2)
    assert raised.metadata["size"] == "4"
    # Bytes of another digest (they stay staged for another try).
    with rpc_error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
        commit()
    # An unknown upload, and one of another repository: no lease is taken at all.
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        commit(upload_id="no-such-upload-" + secrets.token_hex(8))
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        commit(repository=repo(), data=data[4:], offset=4)
    assert leases(stack) == []
    assert tables(stack) == before

    # A finished upload: cancelled, then committed (with or without data).
    rpc.CancelUpload(pb.CancelUploadRequest(repository=repository, upload_id=upload_id))
    cancelled = tables(stack)
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        commit()
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        commit(data=data[4:], offset=4)
    assert leases(stack) == []
    assert tables(stack) == cancelled


def test_calls_that_succeed_consume_their_lease(stack: Stack) -> None:
    rpc, repository = registry(stack.address), repo()
    data = secrets.token_bytes(100)
    assert push(rpc, repository, digest_of(data), len(data), data).size == len(data)
    upload_id = rpc.StartUpload(pb.StartUploadRequest(repository=repository)).id
    other = secrets.token_bytes(50)
    rpc.CommitUpload(
        pb.CommitUploadRequest(
            repository=repository, upload_id=upload_id, digest=digest_of(other), data=other
        )
    )
    assert leases(stack) == []
