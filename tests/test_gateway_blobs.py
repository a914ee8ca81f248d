"""End to end through a real gateway on real blobsvc and linksvc processes (SQLite and
PostgreSQL): the OCI conformance suite's blob scenarios in gRPC form, for everything but the
resumable upload (tests/test_gateway_uploads.py); backends that fail or go away are in
tests/test_gateway_backend_failures.py.

Each test works in repositories of its own and with random bytes, so the module shares one
stack per database kind.
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


@pytest.fixture(scope="module", params=DB_KINDS)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with running_stack(request.param, tmp_path_factory.mktemp(f"blobs-{request.param}")) as s:
        yield s


@pytest.fixture(scope="module")
def rpc(stack: Stack) -> registry_pb2_grpc.RegistryStub:
    return registry(stack.address)


def new_repo() -> str:
    return f"blobs/{secrets.token_hex(5)}"


@pytest.fixture
def repo() -> str:
    return new_repo()


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def read(
    rpc: registry_pb2_grpc.RegistryStub, repo: str, digest: str, offset: int = 0, length: int = 0
) -> tuple[pb.Descriptor, bytes]:
    """ReadBlob: the descriptor of the first message, and all the data."""
    messages = list(
        rpc.ReadBlob(
            pb.ReadBlobRequest(repository=repo, digest=digest, offset=offset, length=length)
        )
    )
    assert messages and messages[0].HasField("blob")
    assert not any(m.HasField("blob") for m in messages[1:])
    return messages[0].blob, b"".join(m.data for m in messages)


def push(
    rpc: registry_pb2_grpc.RegistryStub,
    repo: str,
    chunks: Iterable[bytes],
    *,
    digest: str = "",
    media_type: str = "",
    size: int | None = None,
) -> pb.Descriptor:
    def messages() -> Iterator[pb.PushBlobRequest]:
        yield pb.PushBlobRequest(
            header=pb.PushBlobRequest.Header(
                repository=repo, media_type=media_type, digest=digest, size=size
            )
        )
        for chunk in chunks:
            yield pb.PushBlobRequest(data=chunk)

    return rpc.PushBlob(messages())


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def assert_stored(
    rpc: registry_pb2_grpc.RegistryStub, repo: str, data: bytes, media_type: str = ""
) -> None:
    """After a push: stat and read through the repository give the same bytes."""
    digest = digest_of(data)
    want = pb.Descriptor(digest=digest, size=len(data), media_type=media_type)
    assert rpc.StatBlob(pb.StatBlobRequest(repository=repo, digest=digest)) == want
    desc, got = read(rpc, repo, digest)
    assert desc == want
    assert got == data


def assert_not_linked(rpc: registry_pb2_grpc.RegistryStub, repo: str, digest: str) -> None:
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):
        rpc.StatBlob(pb.StatBlobRequest(repository=repo, digest=digest))
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):
        read(rpc, repo, digest)


# --- pulling what is not there -----------------------------------------------------------------


def test_pull_of_a_missing_blob(rpc: registry_pb2_grpc.RegistryStub, repo: str) -> None:
    assert_not_linked(rpc, repo, digest_of(os.urandom(16)))
    assert_not_linked(rpc, repo, digest_of(os.urandom(16), "sha512"))


# --- monolithic pushes ---------------------------------------------------------------------------


def test_put_blob(rpc: registry_pb2_grpc.RegistryStub, repo: str) -> None:
    data = os.urandom(1000)
    desc = rpc.PutBlob(
        pb.PutBlobRequest(repository=repo, data=data, media_type="application/octet-stream")
    )
    assert desc == pb.Descriptor(
        digest=digest_of(data), size=len(data), media_type="application/octet-stream"
    )
    assert_stored(rpc, repo, data, "application/octet-stream")
    # Idempotent: the same put again is harmless and answers the same.
    again = rpc.PutBlob(
        pb.PutBlobRequest(repository=repo, data=data, media_type="application/octet-stream")
    )
    assert again == desc


def test_put_blob_with_its_digest_and_at_the_size_limit(
    rpc: registry_pb2_grpc.RegistryStub, repo: str
) -> None:
    data = os.urandom(MAX_CHUNK_BYTES)
    desc = rpc.PutBlob(pb.PutBlobRequest(repository=repo, data=data, digest=digest_of(data)))
    assert desc.size == MAX_CHUNK_BYTES
    assert_stored(rpc, repo, data)


def test_push_blob_in_one_chunk_and_in_several(
    rpc: registry_pb2_grpc.RegistryStub, repo: str
) -> None:
    one = os.urandom(100_000)
    assert push(rpc, repo, [one], media_type="text/plain").digest == digest_of(one)
    assert_stored(rpc, repo, one, "text/plain")

    several = os.urandom(5 * MiB + 123)
    desc = push(rpc, repo, split(several, MiB), digest=digest_of(several), size=len(several))
    assert desc == pb.Descriptor(digest=digest_of(several), size=len(several))
    assert_stored(rpc, repo, several)
    # Chunks of uneven sizes are as good.
    uneven = [os.urandom(n) for n in (1, 3 * MiB, 77, 0, 2 * MiB)]
    data = b"".join(uneven)
    assert push(rpc, repo, uneven).digest == digest_of(data)
    assert_stored(rpc, repo, data)


def test_push_of_a_stored_blob_with_its_digest_returns_without_reading(
    rpc: registry_pb2_grpc.RegistryStub, repo: str
) -> None:
    data = os.urandom(2 * MiB)
    first = push(rpc, new_repo(), split(data, MiB))

    # The client declares the digest and would then send junk: the gateway must answer from
    # the header alone (had it read the data, the digest would not match).
    def junk() -> Iterator[bytes]:
        yield os.urandom(MiB)

    desc = push(rpc, repo, junk(), digest=first.digest, media_type="application/x-layer")
    assert desc == pb.Descriptor(
        digest=first.digest, size=len(data), media_type="application/x-layer"
    )
    assert_stored(rpc, repo, data, "application/x-layer")


def test_push_of_a_stored_blob_with_a_wrong_declared_size(
    rpc: registry_pb2_grpc.RegistryStub, repo: str
) -> None:
    data = os.urandom(1000)
    push(rpc, new_repo(), [data])
    with rpc_error(Code.INVALID_ARGUMENT, "SIZE_INVALID"):
        push(rpc, repo, [data], digest=digest_of(data), size=999)
    assert_not_linked(rpc, repo, digest_of(data))


def test_push_of_a_new_blob_with_a_wrong_declared_size(
    rpc: registry_pb2_grpc.RegistryStub, repo: str
) -> None:
    data = os.urandom(1000)
    with rpc_error(Code.INVALID_ARGUMENT, "SIZE_INVALID"):
        push(rpc, repo, [data], size=1001)
    assert_not_linked(rpc, repo, digest_of(data))


def test_bytes_that_do_not_match_their_digest(
    rpc: registry_pb2_grpc.RegistryStub, repo: str
) -> None:
    data = os.urandom(3000)
    claimed = digest_of(os.urandom(3000))
    with rpc_error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
        rpc.PutBlob(pb.PutBlobRequest(repository=repo, data=data, digest=claimed))
    with rpc_error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
        push(rpc, repo, split(data, 1000), digest=claimed)
    sha512_claim = digest_of(os.urandom(10), "sha512")
    with rpc_error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
        push(rpc, repo, [data], digest=sha512_claim)
    # Nothing was linked, neither under the claimed digest nor under the real one.
    for digest in (claimed, sha512_claim, digest_of(data)):
        assert_not_linked(rpc, repo, digest)
    assert list(rpc.ListBlobs(pb.ListBlobsRequest(repository=repo)).blobs) == []


# --- reading ranges ------------------------------------------------------------------------------


def test_range_reads(rpc: registry_pb2_grpc.RegistryStub, repo: str) -> None:
    data = os.urandom(3 * MiB + 5)
    desc = push(rpc, repo, split(data, MiB))
    digest = desc.digest

    def ranged(offset: int, length: int = 0) -> bytes:
        got_desc, got = read(rpc, repo, digest, offset, length)
        assert got_desc == desc  # the first message describes the whole blob
        return got

    assert ranged(0, 10) == data[:10]
    assert ranged(MiB - 3, MiB + 7) == data[MiB - 3 : 2 * MiB + 4]
    assert ranged(2 * MiB + 1) == data[2 * MiB + 1 :]  # open-ended
    assert ranged(len(data) - 1) == data[-1:]
    assert ranged(10, len(data) * 2) == data[10:]  # a length past the end is cut there
    assert ranged(len(data)) == b""  # at the end: nothing, like an empty HTTP range
    with rpc_error(Code.OUT_OF_RANGE, "RANGE_INVALID") as err:
        read(rpc, repo, digest, len(data) + 1)
    assert err.metadata["size"] == str(len(data))
    with rpc_error(Code.INVALID_ARGUMENT, "RANGE_INVALID"):
        read(rpc, repo, digest, -1)
    with rpc_error(Code.INVALID_ARGUMENT, "RANGE_INVALID"):
        read(rpc, repo, digest, 0, -5)


# --- the empty blob and sha512 -------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_the_empty_blob(rpc: registry_pb2_grpc.RegistryStub, algorithm: str) -> None:
    empty = digest_of(b"", algorithm)
    want = pb.Descriptor(digest=empty, size=0)
    put_repo, push_repo, mount_repo = new_repo(), new_repo(), new_repo()
    assert rpc.PutBlob(pb.PutBlobRequest(repository=put_repo, data=b"", digest=empty)) == want
    assert push(rpc, push_repo, [], digest=empty) == want
    assert push(rpc, new_repo(), [b""], digest=empty, size=0) == want
    for repo in (put_repo, push_repo):
        assert rpc.StatBlob(pb.StatBlobRequest(repository=repo, digest=empty)) == want
        assert read(rpc, repo, empty) == (want, b"")
        with rpc_error(Code.OUT_OF_RANGE, "RANGE_INVALID"):
            read(rpc, repo, empty, 1)
    mounted = rpc.MountBlob(
        pb.MountBlobRequest(repository=mount_repo, from_repository=put_repo, digest=empty)
    )
    assert mounted == want
    if algorithm == "sha256":  # with no digest given, sha256 of the data
        assert rpc.PutBlob(pb.PutBlobRequest(repository=new_repo(), data=b"")) == want
        assert push(rpc, new_repo(), []) == want


def test_sha512_blobs(rpc: registry_pb2_grpc.RegistryStub, repo: str) -> None:
    small = os.urandom(5000)
    desc = rpc.PutBlob(
        pb.PutBlobRequest(repository=repo, data=small, digest=digest_of(small, "sha512"))
    )
    assert desc == pb.Descriptor(digest=digest_of(small, "sha512"), size=len(small))
    big = os.urandom(2 * MiB + 1)
    digest = digest_of(big, "sha512")
    assert push(rpc, repo, split(big, MiB), digest=digest).digest == digest
    for data in (small, big):
        d = digest_of(data, "sha512")
        assert rpc.StatBlob(pb.StatBlobRequest(repository=repo, digest=d)).size == len(data)
        assert read(rpc, repo, d)[1] == data
        assert read(rpc, repo, d, 7, 100)[1] == data[7:107]
    # The same bytes under sha256 are another blob, not linked here.
    assert_not_linked(rpc, repo, digest_of(big))


# --- mounting ------------------------------------------------------------------------------------


def test_mount_with_and_without_a_source(rpc: registry_pb2_grpc.RegistryStub) -> None:
    source, with_source, without_source = new_repo(), new_repo(), new_repo()
    data = os.urandom(4000)
    pushed = push(rpc, source, [data], media_type="application/x-src")
    mounted = rpc.MountBlob(
        pb.MountBlobRequest(repository=with_source, from_repository=source, digest=pushed.digest)
    )
    assert mounted == pushed  # the source link's media type by default
    assert_stored(rpc, with_source, data, "application/x-src")
    # With no source: any repository that links it will do; a media type of its own.
    mounted = rpc.MountBlob(
        pb.MountBlobRequest(
            repository=without_source, digest=pushed.digest, media_type="application/x-mine"
        )
    )
    assert mounted.media_type == "application/x-mine"
    assert_stored(rpc, without_source, data, "application/x-mine")
    # Mounting again is harmless.
    again = rpc.MountBlob(
        pb.MountBlobRequest(repository=with_source, from_repository=source, digest=pushed.digest)
    )
    assert again.digest == pushed.digest


def test_mount_of_a_blob_the_source_does_not_link(rpc: registry_pb2_grpc.RegistryStub) -> None:
    owner, other, target = new_repo(), new_repo(), new_repo()
    data = os.urandom(4000)
    pushed = push(rpc, owner, [data])
    rpc.PutBlob(pb.PutBlobRequest(repository=other, data=os.urandom(10)))
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):
        rpc.MountBlob(
            pb.MountBlobRequest(repository=target, from_repository=other, digest=pushed.digest)
        )
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):  # a source that does not exist at all
        rpc.MountBlob(
            pb.MountBlobRequest(repository=target, from_repository=new_repo(), digest=pushed.digest)
        )
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):  # a blob nobody links
        rpc.MountBlob(pb.MountBlobRequest(repository=target, digest=digest_of(os.urandom(9))))
    assert_not_linked(rpc, target, pushed.digest)


# --- access through links ------------------------------------------------------------------------


def test_a_blob_is_reached_only_through_repositories_that_link_it(
    rpc: registry_pb2_grpc.RegistryStub,
) -> None:
    a, b, c = new_repo(), new_repo(), new_repo()
    data = os.urandom(3000)
    desc = push(rpc, a, [data])
    rpc.PutBlob(pb.PutBlobRequest(repository=b, data=os.urandom(5)))  # b exists, without it
    assert_not_linked(rpc, b, desc.digest)
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):  # mount into c with b as the source
        rpc.MountBlob(pb.MountBlobRequest(repository=c, from_repository=b, digest=desc.digest))
    assert_not_linked(rpc, c, desc.digest)
    # Once b links it (by pushing the same bytes), b reaches it, and can be a mount source.
    push(rpc, b, [data])
    assert_stored(rpc, b, data)
    rpc.MountBlob(pb.MountBlobRequest(repository=c, from_repository=b, digest=desc.digest))
    assert_stored(rpc, c, data)


# --- deleting ------------------------------------------------------------------------------------


def test_delete_then_stat_is_not_found(rpc: registry_pb2_grpc.RegistryStub) -> None:
    repo, other = new_repo(), new_repo()
    data = os.urandom(2000)
    desc = push(rpc, repo, [data])
    push(rpc, other, [data])
    rpc.DeleteBlob(pb.DeleteBlobRequest(repository=repo, digest=desc.digest))
    assert_not_linked(rpc, repo, desc.digest)
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):  # nothing left to delete
        rpc.DeleteBlob(pb.DeleteBlobRequest(repository=repo, digest=desc.digest))
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):  # and it is no mount source any more
        rpc.MountBlob(
            pb.MountBlobRequest(repository=new_repo(), from_repository=repo, digest=desc.digest)
        )
    assert_stored(rpc, other, data)  # another repository's link is untouched
    # Pushing it again links it again.
    push(rpc, repo, [data])
    assert_stored(rpc, repo, data)


def test_delete_is_unsupported_unless_enabled(stack: Stack, repo: str) -> None:
    plain = registry(stack.another_gateway(enable_delete=False).address)
    desc = plain.PutBlob(pb.PutBlobRequest(repository=repo, data=os.urandom(100)))
    with rpc_error(Code.FAILED_PRECONDITION, "UNSUPPORTED"):
        plain.DeleteBlob(pb.DeleteBlobRequest(repository=repo, digest=desc.digest))
    assert plain.StatBlob(pb.StatBlobRequest(repository=repo, digest=desc.digest)) == desc


# --- listing -------------------------------------------------------------------------------------


def test_list_blobs_in_pages(rpc: registry_pb2_grpc.RegistryStub, repo: str) -> None:
    descs = [
        rpc.PutBlob(pb.PutBlobRequest(repository=repo, data=os.urandom(50), media_type="a/b"))
        for _ in range(5)
    ]
    seen: list[pb.Descriptor] = []
    token = ""
    pages = 0
    while True:
        page = rpc.ListBlobs(pb.ListBlobsRequest(repository=repo, page_size=2, page_token=token))
        assert len(page.blobs) <= 2
        seen.extend(page.blobs)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == sorted(descs, key=lambda d: d.digest)
    everything = rpc.ListBlobs(pb.ListBlobsRequest(repository=repo))
    assert list(everything.blobs) == seen and not everything.next_page_token
    # A repository that links nothing lists nothing.
    assert not rpc.ListBlobs(pb.ListBlobsRequest(repository=new_repo())).blobs


def test_list_repositories_in_pages(rpc: registry_pb2_grpc.RegistryStub) -> None:
    prefix = f"list{secrets.token_hex(3)}"
    names = sorted(f"{prefix}/r{i}" for i in range(5))
    for name in names:
        rpc.PutBlob(pb.PutBlobRequest(repository=name, data=b"x"))
    listed: list[str] = []
    token = ""
    while True:
        page = rpc.ListRepositories(pb.ListRepositoriesRequest(page_size=3, page_token=token))
        assert len(page.repositories) <= 3
        listed.extend(page.repositories)
        token = page.next_page_token
        if not token:
            break
    assert listed == sorted(listed)
    assert [n for n in listed if n.startswith(prefix)] == names


# --- bad input -----------------------------------------------------------------------------------

BAD_NAMES = ["", "UPPER/case", "a//b", "-lead", "a" * 256, "x/y:tag"]
BAD_DIGESTS = ["", "sha256:abc", "md5:" + "0" * 32, "sha256:" + "G" * 64, "SHA256:" + "0" * 64]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_malformed_repository_names(rpc: registry_pb2_grpc.RegistryStub, name: str) -> None:
    digest = digest_of(b"x")
    calls = [
        lambda: rpc.StatBlob(pb.StatBlobRequest(repository=name, digest=digest)),
        lambda: read(rpc, name, digest),
        lambda: rpc.PutBlob(pb.PutBlobRequest(repository=name, data=b"x")),
        lambda: push(rpc, name, [b"x"]),
        lambda: rpc.StartUpload(pb.StartUploadRequest(repository=name)),
        lambda: rpc.MountBlob(pb.MountBlobRequest(repository=name, digest=digest)),
        lambda: rpc.MountBlob(
            pb.MountBlobRequest(repository="ok", from_repository=name or "A", digest=digest)
        ),
        lambda: rpc.DeleteBlob(pb.DeleteBlobRequest(repository=name, digest=digest)),
        lambda: rpc.ListBlobs(pb.ListBlobsRequest(repository=name)),
    ]
    for call in calls:
        with rpc_error(Code.INVALID_ARGUMENT, "NAME_INVALID"):
            call()


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_malformed_digests(rpc: registry_pb2_grpc.RegistryStub, repo: str, digest: str) -> None:
    calls = [
        lambda: rpc.StatBlob(pb.StatBlobRequest(repository=repo, digest=digest)),
        lambda: read(rpc, repo, digest),
        lambda: rpc.MountBlob(pb.MountBlobRequest(repository=repo, digest=digest)),
        lambda: rpc.DeleteBlob(pb.DeleteBlobRequest(repository=repo, digest=digest)),
    ]
    if digest:  # empty means "none given" where the digest is optional
        calls += [
            lambda: rpc.PutBlob(pb.PutBlobRequest(repository=repo, data=b"x", digest=digest)),
            lambda: push(rpc, repo, [b"x"], digest=digest),
        ]
    for call in calls:
        with rpc_error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
            call()
    assert not rpc.ListBlobs(pb.ListBlobsRequest(repository=repo)).blobs


def test_malformed_media_types(rpc: registry_pb2_grpc.RegistryStub, repo: str) -> None:
    for media_type in ("text", "a/b/c", "a b/c", "x" * 300 + "/y"):
        with rpc_error(Code.INVALID_ARGUMENT, "NAME_INVALID"):
            rpc.PutBlob(pb.PutBlobRequest(repository=repo, data=b"x", media_type=media_type))
        with rpc_error(Code.INVALID_ARGUMENT, "NAME_INVALID"):
            push(rpc, repo, [b"x"], media_type=media_type)
    assert not rpc.ListBlobs(pb.ListBlobsRequest(repository=repo)).blobs


def test_oversize_messages(rpc: registry_pb2_grpc.RegistryStub, repo: str) -> None:
    big = os.urandom(MAX_CHUNK_BYTES + 1)
    with rpc_error(Code.RESOURCE_EXHAUSTED, "SIZE_INVALID"):
        rpc.PutBlob(pb.PutBlobRequest(repository=repo, data=big))
    with rpc_error(Code.RESOURCE_EXHAUSTED, "SIZE_INVALID"):
        push(rpc, repo, [b"fine", big])
    assert not rpc.ListBlobs(pb.ListBlobsRequest(repository=repo)).blobs


def test_bad_push_streams(rpc: registry_pb2_grpc.RegistryStub, repo: str) -> None:
    header = pb.PushBlobRequest(header=pb.PushBlobRequest.Header(repository=repo))
    data = pb.PushBlobRequest(data=b"abc")
    for messages in ([], [data], [header, data, header]):
        with rpc_error(Code.INVALID_ARGUMENT, "BLOB_UPLOAD_INVALID"):
            rpc.PushBlob(iter(messages))
    with rpc_error(Code.INVALID_ARGUMENT, "SIZE_INVALID"):
        push(rpc, repo, [b"x"], size=-2)
    assert not rpc.ListBlobs(pb.ListBlobsRequest(repository=repo)).blobs


@pytest.mark.parametrize("page_size,token", [(-1, ""), (-(2**31), ""), (10, "t" * 2000)])
def test_bad_pages(
    rpc: registry_pb2_grpc.RegistryStub, repo: str, page_size: int, token: str
) -> None:
    with rpc_error(Code.INVALID_ARGUMENT, "PAGINATION_INVALID"):
        rpc.ListBlobs(pb.ListBlobsRequest(repository=repo, page_size=page_size, page_token=token))
    with rpc_error(Code.INVALID_ARGUMENT, "PAGINATION_INVALID"):
        rpc.ListRepositories(pb.ListRepositoriesRequest(page_size=page_size, page_token=token))


def test_a_page_token_linksvc_did_not_issue(rpc: registry_pb2_grpc.RegistryStub, repo: str) -> None:
    with rpc_error(Code.INVALID_ARGUMENT, "PAGINATION_INVALID"):
        rpc.ListBlobs(pb.ListBlobsRequest(repository=repo, page_token="not-a-token!"))
