"""linksvc end to end, the lifecycle's calls (Lease, Link with a lease, MarkUnreferenced,
ListCollectable, FenceBlob, ForgetBlob, AdoptBlob, ListBlobs, the runner lock) through the
generated stubs, and their bad input refused."""

from __future__ import annotations

import grpc
from google.protobuf.message import Message

from linkedblob.errors import Reason, error_info
from linkedblob.link.v1 import link_pb2 as pb
from linkedblob.link.v1 import link_pb2_grpc
from tests.linksvc_service_helpers import Code, digest_of, linksvc, refused, snapshot, stub
from tests.test_linksvc_service_calls import BAD_DIGESTS, forge_token

FIXTURES = (linksvc, stub)
Stub = link_pb2_grpc.LinkServiceStub


def test_a_blob_through_its_lifecycle(stub: Stub) -> None:
    d = digest_of("lifecycle")
    # A push: a lease, then the link that records the blob and consumes the lease.
    lease = stub.Lease(pb.LeaseRequest(digest=d, ttl_seconds=60))
    assert lease.lease_id and lease.expires_at.seconds > 0 and not lease.HasField("linked")
    refused(
        lambda: stub.Link(pb.LinkRequest(repository="r", digest=d, size=3)),
        Code.ABORTED,
        Reason.BLOB_UPLOAD_INVALID,
    )
    linked = stub.Link(pb.LinkRequest(repository="r", digest=d, size=3, lease_id=lease.lease_id))
    assert linked.created and linked.blob == pb.Descriptor(digest=d, size=3)
    # A push of a known blob: linked at once, no lease.
    at_once = stub.Lease(pb.LeaseRequest(digest=d, link_repository="s", media_type="a/b", size=3))
    assert at_once.lease_id == "" and at_once.linked.created
    assert at_once.linked.blob == pb.Descriptor(digest=d, size=3, media_type="a/b")
    refused(
        lambda: stub.Lease(pb.LeaseRequest(digest=d, link_repository="t", size=4)),
        Code.INVALID_ARGUMENT,
        Reason.SIZE_INVALID,
    )

    (listed,) = stub.ListBlobs(pb.ListBlobsRequest()).blobs
    assert (listed.digest, listed.size, listed.state, listed.version) == (
        d, 3, pb.IndexedBlob.ACTIVE, 0
    )  # fmt: skip
    assert stub.MarkUnreferenced(pb.MarkUnreferencedRequest()).marked == 0
    for repository in ("r", "s"):
        stub.Unlink(pb.UnlinkRequest(repository=repository, digest=d))
    assert stub.MarkUnreferenced(pb.MarkUnreferencedRequest()) == pb.MarkUnreferencedResponse(
        marked=1
    )
    assert not stub.ListCollectable(pb.ListCollectableRequest(grace_seconds=3600)).blobs
    (candidate,) = stub.ListCollectable(pb.ListCollectableRequest()).blobs
    assert (candidate.state, candidate.version) == (pb.IndexedBlob.MARKED, 1)

    stale = stub.FenceBlob(pb.FenceBlobRequest(digest=d, version=0))
    assert not stale.fenced and stale.blob == candidate
    fence = stub.FenceBlob(pb.FenceBlobRequest(digest=d, version=candidate.version))
    assert fence.fenced and fence.blob.state == pb.IndexedBlob.DELETING
    assert fence.blob.version == 2
    for call in (
        lambda: stub.Link(pb.LinkRequest(repository="r", digest=d)),
        lambda: stub.Mount(pb.MountRequest(repository="r", digest=d)),
        lambda: stub.Lease(pb.LeaseRequest(digest=d)),
        lambda: stub.RecordBlob(pb.RecordBlobRequest(digest=d, size=3)),
    ):
        refused(call, Code.ABORTED, Reason.BLOB_DELETING)
    assert not stub.ForgetBlob(pb.ForgetBlobRequest(digest=d, version=1)).forgotten
    assert stub.ForgetBlob(pb.ForgetBlobRequest(digest=d, version=2)).forgotten
    assert not stub.ForgetBlob(pb.ForgetBlobRequest(digest=d, version=2)).forgotten
    gone = stub.FenceBlob(pb.FenceBlobRequest(digest=d, version=2))
    assert not gone.fenced and not gone.HasField("blob")

    # fsck's repair: adopted as marked; a recorded blob is left alone.
    assert stub.AdoptBlob(pb.AdoptBlobRequest(digest=d, size=3)).adopted
    assert not stub.AdoptBlob(pb.AdoptBlobRequest(digest=d, size=3)).adopted
    refused(
        lambda: stub.AdoptBlob(pb.AdoptBlobRequest(digest=d, size=4)),
        Code.FAILED_PRECONDITION,
        Reason.SIZE_INVALID,
    )
    (adopted,) = stub.ListBlobs(pb.ListBlobsRequest()).blobs
    assert adopted.state == pb.IndexedBlob.MARKED


def test_release_lease(stub: Stub) -> None:
    """A lease given back records nothing any more; another lease of the digest stays; a
    second release, or one naming another digest, answers released false."""
    d, other = digest_of("release me"), digest_of("not this one")
    mine = stub.Lease(pb.LeaseRequest(digest=d, ttl_seconds=60)).lease_id
    theirs = stub.Lease(pb.LeaseRequest(digest=d, ttl_seconds=60)).lease_id
    release = stub.ReleaseLease
    assert not release(pb.ReleaseLeaseRequest(digest=other, lease_id=mine)).released
    assert release(pb.ReleaseLeaseRequest(digest=d, lease_id=mine)).released
    assert not release(pb.ReleaseLeaseRequest(digest=d, lease_id=mine)).released
    refused(
        lambda: stub.Link(pb.LinkRequest(repository="r", digest=d, size=3, lease_id=mine)),
        Code.ABORTED,
        Reason.BLOB_UPLOAD_INVALID,
    )
    linked = stub.Link(pb.LinkRequest(repository="r", digest=d, size=3, lease_id=theirs))
    assert linked.created
    assert not release(pb.ReleaseLeaseRequest(digest=d, lease_id=theirs)).released  # consumed


def test_paging_of_blobs_and_candidates(stub: Stub) -> None:
    digests = sorted(digest_of(f"paged {i}") for i in range(5))
    for d in digests:
        stub.AdoptBlob(pb.AdoptBlobRequest(digest=d, size=1))
    for method, request_type in (
        ("ListBlobs", pb.ListBlobsRequest),
        ("ListCollectable", pb.ListCollectableRequest),
    ):
        seen: list[str] = []
        token = ""
        while True:
            page = getattr(stub, method)(request_type(page_size=2, page_token=token))
            seen += [b.digest for b in page.blobs]
            token = page.next_page_token
            if not token:
                break
        assert seen == digests, method


def test_the_runner_lock(stub: Stub) -> None:
    mine = stub.AcquireRunnerLock(
        pb.AcquireRunnerLockRequest(name="gc", holder="a", ttl_seconds=60)
    )
    assert mine.acquired and mine.holder == "a" and mine.expires_at.seconds > 0
    theirs = stub.AcquireRunnerLock(
        pb.AcquireRunnerLockRequest(name="gc", holder="b", ttl_seconds=60)
    )
    assert (theirs.acquired, theirs.holder, theirs.expires_at) == (False, "a", mine.expires_at)
    stub.ReleaseRunnerLock(pb.ReleaseRunnerLockRequest(name="gc", holder="b"))  # not held by b
    stub.ReleaseRunnerLock(pb.ReleaseRunnerLockRequest(name="gc", holder="a"))
    stub.ReleaseRunnerLock(pb.ReleaseRunnerLockRequest(name="gc", holder="a"))  # idempotent
    assert stub.AcquireRunnerLock(
        pb.AcquireRunnerLockRequest(name="gc", holder="b", ttl_seconds=1)
    ).acquired


IA = Code.INVALID_ARGUMENT
Case = tuple[str, str, Message, grpc.StatusCode, Reason]


def bad_requests(tokens: dict[str, str]) -> list[Case]:
    d = digest_of("known")
    cases: list[Case] = []
    for i, bad in enumerate(BAD_DIGESTS):
        cases += [
            (f"lease digest {i}", "Lease", pb.LeaseRequest(digest=bad), IA, Reason.DIGEST_INVALID),
            (f"release lease digest {i}", "ReleaseLease",
             pb.ReleaseLeaseRequest(digest=bad, lease_id="a" * 32), IA, Reason.DIGEST_INVALID),
            (f"fence digest {i}", "FenceBlob", pb.FenceBlobRequest(digest=bad), IA,
             Reason.DIGEST_INVALID),
            (f"forget digest {i}", "ForgetBlob", pb.ForgetBlobRequest(digest=bad), IA,
             Reason.DIGEST_INVALID),
            (f"adopt digest {i}", "AdoptBlob", pb.AdoptBlobRequest(digest=bad, size=1), IA,
             Reason.DIGEST_INVALID),
        ]  # fmt: skip
    cases += [
        ("lease negative ttl", "Lease", pb.LeaseRequest(digest=d, ttl_seconds=-1), IA,
         Reason.BLOB_UPLOAD_INVALID),
        ("lease ttl too long", "Lease", pb.LeaseRequest(digest=d, ttl_seconds=86401), IA,
         Reason.BLOB_UPLOAD_INVALID),
        ("lease bad repository", "Lease", pb.LeaseRequest(digest=d, link_repository="A"), IA,
         Reason.NAME_INVALID),
        ("lease bad media type", "Lease",
         pb.LeaseRequest(digest=d, link_repository="r", media_type="text"), IA,
         Reason.NAME_INVALID),
        ("lease negative size", "Lease", pb.LeaseRequest(digest=d, link_repository="r", size=-1),
         IA, Reason.SIZE_INVALID),
        ("link bad lease id", "Link",
         pb.LinkRequest(repository="r", digest=d, size=1, lease_id="a b"), IA,
         Reason.BLOB_UPLOAD_INVALID),
        ("link long lease id", "Link",
         pb.LinkRequest(repository="r", digest=d, size=1, lease_id="a" * 129), IA,
         Reason.BLOB_UPLOAD_INVALID),
        ("release lease no id", "ReleaseLease", pb.ReleaseLeaseRequest(digest=d), IA,
         Reason.BLOB_UPLOAD_INVALID),
        ("release lease bad id", "ReleaseLease",
         pb.ReleaseLeaseRequest(digest=d, lease_id="a b"), IA, Reason.BLOB_UPLOAD_INVALID),
        ("release lease long id", "ReleaseLease",
         pb.ReleaseLeaseRequest(digest=d, lease_id="a" * 129), IA, Reason.BLOB_UPLOAD_INVALID),
        ("collectable negative grace", "ListCollectable",
         pb.ListCollectableRequest(grace_seconds=-1), IA, Reason.UNSUPPORTED),
        ("collectable negative takeover", "ListCollectable",
         pb.ListCollectableRequest(takeover_seconds=-1), IA, Reason.UNSUPPORTED),
        ("collectable page size", "ListCollectable", pb.ListCollectableRequest(page_size=-1),
         IA, Reason.PAGINATION_INVALID),
        ("collectable foreign token", "ListCollectable",
         pb.ListCollectableRequest(page_token=tokens["blobs"]), IA, Reason.PAGINATION_INVALID),
        ("collectable forged token", "ListCollectable",
         pb.ListCollectableRequest(page_token=forge_token("collectable\n\nnot a digest")), IA,
         Reason.PAGINATION_INVALID),
        ("blobs page size", "ListBlobs", pb.ListBlobsRequest(page_size=-1), IA,
         Reason.PAGINATION_INVALID),
        ("blobs garbage token", "ListBlobs", pb.ListBlobsRequest(page_token="!!"), IA,
         Reason.PAGINATION_INVALID),
        ("blobs scoped token", "ListBlobs",
         pb.ListBlobsRequest(page_token=forge_token(f"blobs\nr\n{d}")), IA,
         Reason.PAGINATION_INVALID),
        ("fence negative version", "FenceBlob", pb.FenceBlobRequest(digest=d, version=-1), IA,
         Reason.UNSUPPORTED),
        ("forget negative version", "ForgetBlob", pb.ForgetBlobRequest(digest=d, version=-1),
         IA, Reason.UNSUPPORTED),
        ("adopt negative size", "AdoptBlob", pb.AdoptBlobRequest(digest=d, size=-1), IA,
         Reason.SIZE_INVALID),
        ("acquire no name", "AcquireRunnerLock",
         pb.AcquireRunnerLockRequest(holder="h", ttl_seconds=1), IA, Reason.NAME_INVALID),
        ("acquire no holder", "AcquireRunnerLock",
         pb.AcquireRunnerLockRequest(name="gc", ttl_seconds=1), IA, Reason.NAME_INVALID),
        ("acquire long name", "AcquireRunnerLock",
         pb.AcquireRunnerLockRequest(name="g" * 256, holder="h", ttl_seconds=1), IA,
         Reason.NAME_INVALID),
        ("acquire no ttl", "AcquireRunnerLock",
         pb.AcquireRunnerLockRequest(name="gc", holder="h"), IA, Reason.UNSUPPORTED),
        ("acquire ttl too long", "AcquireRunnerLock",
         pb.AcquireRunnerLockRequest(name="gc", holder="h", ttl_seconds=3601), IA,
         Reason.UNSUPPORTED),
        ("release no name", "ReleaseRunnerLock", pb.ReleaseRunnerLockRequest(holder="h"), IA,
         Reason.NAME_INVALID),
        ("release no holder", "ReleaseRunnerLock", pb.ReleaseRunnerLockRequest(name="gc"), IA,
         Reason.NAME_INVALID),
    ]  # fmt: skip
    return cases


def test_bad_input_is_refused_and_changes_nothing(db_url: str, stub: Stub) -> None:
    for i in range(3):
        stub.AdoptBlob(pb.AdoptBlobRequest(digest=digest_of(f"x{i}"), size=1))
    tokens = {"blobs": stub.ListBlobs(pb.ListBlobsRequest(page_size=1)).next_page_token}
    assert tokens["blobs"]
    before = snapshot(db_url)
    failures = []
    for name, method, request, code, reason in bad_requests(tokens):
        try:
            getattr(stub, method)(request)
        except grpc.RpcError as err:
            info = error_info(err)
            got = (err.code(), info.reason if info else None)  # type: ignore[attr-defined]
            if got != (code, reason):
                failures.append(f"{name}: {got} != {(code, reason)}: {err.details()}")  # type: ignore[attr-defined]
        else:
            failures.append(f"{name}: accepted")
    assert not failures, "\n".join(failures)
    assert snapshot(db_url) == before
