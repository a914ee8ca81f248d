"""The gateway's commit order with a lease (issue 10), on the in-memory backends: every path that
commits bytes in blobsvc takes a lease of the digest first and links with it; a recorded blob is
linked by the lease itself, without its bytes; marked blobs are revived; a blob being deleted is
waited for, then refused ABORTED / BLOB_DELETING; a lease that expired before the link is
answered ABORTED / BLOB_UPLOAD_INVALID; a cancel is idempotent and survives blobsvc being away.

The fakes share one journal of calls (``links.lease``, ``blobs.put``, ...), so the order of the
backend calls is asserted as made.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest

from gateway import validation
from gateway.fakes import BlobState, FakeBlobBackend, FakeLinkBackend
from gateway.leases import DELETING_BACKOFF
from gateway.linkcache import CachedLinks, LinkCache
from gateway.model import IncomingData, LinkedBlob, SessionState
from gateway.options import DEFAULT_LEASE_TTL
from gateway.registry import Registry
from gateway.uploads import Uploads
from linkedblob import transport, wire
from linkedblob.digests import Digest
from linkedblob.errors import LinkedBlobError, Reason, aborted, unavailable

Code = grpc.StatusCode
T = TypeVar("T")
REPO = "leases/repo"
BACKOFF = (0.001, 0.002, 0.004)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def digest_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Gateway:
    blobs: FakeBlobBackend
    links: FakeLinkBackend
    cache: LinkCache[LinkedBlob]
    registry: Registry
    uploads: Uploads
    clock: Clock
    journal: list[str] = field(default_factory=list)

    def calls(self) -> list[str]:
        """The backend calls made since the last look."""
        made = list(self.journal)
        self.journal.clear()
        return made


def gateway(ttl: float = 60.0) -> Gateway:
    journal: list[str] = []
    clock = Clock()
    blobs, links = FakeBlobBackend(journal), FakeLinkBackend(clock, journal)
    cache: LinkCache[LinkedBlob] = LinkCache(60.0, 100)
    cached = CachedLinks(links, cache)
    registry = Registry(
        blobs,
        cached,
        enable_delete=True,
        abort_again_after=0.01,
        lease_ttl=ttl,
        deleting_backoff=BACKOFF,
    )
    uploads = Uploads(blobs, cached, lease_ttl=ttl, deleting_backoff=BACKOFF)
    return Gateway(blobs, links, cache, registry, uploads, clock, journal)


async def _messages(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield wire.data_message(transport.PUSH_BLOB_DATA, chunk)


def incoming(*chunks: bytes) -> IncomingData:
    return IncomingData(
        _messages(list(chunks)), transport.PUSH_BLOB_DATA, bytes, "test", validation.data_size
    )


def unread() -> IncomingData:
    async def never() -> AsyncIterator[bytes]:
        raise AssertionError("the data was read")
        yield b""  # an async generator

    return IncomingData(never(), transport.PUSH_BLOB_DATA, bytes, "test", validation.data_size)


def raised(code: grpc.StatusCode, reason: str, coro: Coroutine[Any, Any, Any]) -> LinkedBlobError:
    with pytest.raises(LinkedBlobError) as exc_info:
        run(coro)
    assert (exc_info.value.code, exc_info.value.reason) == (code, reason), exc_info.value
    return exc_info.value


async def settled() -> None:
    await asyncio.sleep(0.05)  # background aborts ran


def record(gw: Gateway, data: bytes, repository: str = "other/repo") -> str:
    """A blob stored, recorded and linked elsewhere; the journal cleared."""
    run(gw.registry.put(repository, "", None, data))
    gw.calls()
    return str(digest_of(data))


def test_the_defaults() -> None:
    assert DEFAULT_LEASE_TTL == 600.0
    assert sum(DELETING_BACKOFF) <= 2.0  # the gateway waits at most about 2 s for a deletion


# --- every commit path: lease, commit, link with the lease ------------------------------------


def test_put_of_a_new_blob_leases_puts_and_links_with_the_lease() -> None:
    gw, data = gateway(ttl=42.0), b"a new small blob"
    linked = run(gw.registry.put(REPO, "text/plain", None, data))
    assert linked == LinkedBlob(str(digest_of(data)), len(data), "text/plain")
    assert gw.calls() == ["links.lease", "blobs.put", "links.link"]
    assert gw.links.leases == {}  # consumed by the link (without it the link is refused)
    assert gw.links.states[linked.digest] is BlobState.ACTIVE


def test_put_of_a_recorded_blob_is_one_lease_and_no_blobsvc_call() -> None:
    gw, data = gateway(), b"known"
    digest = record(gw, data)
    linked = run(gw.registry.put(REPO, "text/plain", digest_of(data), data))
    assert linked == LinkedBlob(digest, len(data), "text/plain")
    assert gw.calls() == ["links.lease"]
    assert gw.links.leases == {}
    # The link the lease made is cached, as a Link's is.
    assert run(gw.registry.stat(REPO, digest)) == linked
    assert gw.calls() == []


def test_put_checks_a_given_digest_before_any_call() -> None:
    gw = gateway()
    record(gw, b"the real bytes")
    err = raised(
        Code.INVALID_ARGUMENT,
        Reason.DIGEST_INVALID,
        gw.registry.put(REPO, "", digest_of(b"the real bytes"), b"other bytes"),
    )
    assert err.metadata == {"digest": str(digest_of(b"other bytes"))}
    assert gw.calls() == [] and (REPO, str(digest_of(b"the real bytes"))) not in gw.links.links
    # sha512 when the given digest says so.
    data = b"sha512 put"
    claimed = Digest("sha512", hashlib.sha512(data).hexdigest())
    assert run(gw.registry.put(REPO, "", claimed, data)).digest == str(claimed)


def test_declared_push_leases_then_relays_with_commit_then_links() -> None:
    gw, data = gateway(), b"declared and new" * 100
    linked = run(gw.registry.push(REPO, "", digest_of(data), len(data), incoming(data)))
    assert linked.digest == str(digest_of(data))
    assert gw.calls() == ["links.lease", "blobs.write", "links.link"]
    assert gw.links.leases == {} and gw.blobs.staged == {}


def test_declared_push_of_a_recorded_blob_links_without_reading_the_data() -> None:
    gw, data = gateway(), b"recorded already"
    digest = record(gw, data)
    linked = run(gw.registry.push(REPO, "x/y", digest_of(data), len(data), unread()))
    assert linked == LinkedBlob(digest, len(data), "x/y")
    assert gw.calls() == ["links.lease"]
    err = raised(
        Code.INVALID_ARGUMENT,
        Reason.SIZE_INVALID,
        gw.registry.push("third/repo", "", digest_of(data), 3, unread()),
    )
    assert err.metadata == {"size": str(len(data))}
    assert ("third/repo", digest) not in gw.links.links


def test_undeclared_push_stages_leases_the_staged_digest_commits_and_links() -> None:
    gw, data = gateway(), b"undeclared" * 1000

    async def scenario() -> LinkedBlob:
        linked = await gw.registry.push(REPO, "", None, len(data), incoming(data[:10], data[10:]))
        await settled()
        return linked

    linked = run(scenario())
    assert linked == LinkedBlob(str(digest_of(data)), len(data), "")
    assert gw.calls() == ["blobs.write", "links.lease", "blobs.commit", "links.link"]
    assert gw.blobs.staged == {} and gw.links.leases == {}


def test_undeclared_push_of_a_recorded_digest_drops_its_staging() -> None:
    gw, data = gateway(), b"pushed twice, no digest"
    digest = record(gw, data)

    async def scenario() -> LinkedBlob:
        linked = await gw.registry.push(REPO, "t/t", None, None, incoming(data))
        await settled()
        return linked

    assert run(scenario()) == LinkedBlob(digest, len(data), "t/t")
    assert gw.calls() == ["blobs.write", "links.lease", "blobs.abort"]  # one abort: it ended
    assert gw.blobs.staged == {} and gw.links.leases == {}


def test_undeclared_push_of_the_wrong_size_is_refused_and_dropped() -> None:
    gw, data = gateway(), b"five!"

    async def scenario() -> None:
        with pytest.raises(LinkedBlobError) as exc_info:
            await gw.registry.push(REPO, "", None, 4, incoming(data))
        assert (exc_info.value.reason, exc_info.value.metadata) == (
            Reason.SIZE_INVALID,
            {"size": "5"},
        )
        await settled()

    run(scenario())
    assert gw.calls() == ["blobs.write", "blobs.abort", "blobs.abort"]
    assert gw.blobs.staged == {} and gw.links.links == {}


def test_commit_upload_leases_before_the_commit_and_links_with_the_lease() -> None:
    gw, data = gateway(), b"uploaded in steps"
    upload = run(gw.uploads.start(REPO))
    run(gw.blobs.write(upload.id, 0, data))
    gw.calls()
    linked = run(gw.uploads.commit(REPO, upload.id, digest_of(data), "m/t"))
    assert linked == LinkedBlob(str(digest_of(data)), len(data), "m/t")
    calls = gw.calls()
    # The session and the staged size are read (at once) before the lease is taken.
    assert sorted(calls[:2]) == ["blobs.upload_size", "links.get_session"]
    assert calls[2:] == ["links.lease", "links.advance_session", "blobs.commit", "links.link"]
    assert gw.links.sessions[upload.id].state is SessionState.COMMITTED
    assert gw.links.leases == {}


def test_commit_upload_with_its_last_chunk_leases_first() -> None:
    gw, data = gateway(), b"the last chunk comes with the commit"
    upload = run(gw.uploads.start(REPO))
    gw.calls()
    run(gw.uploads.commit(REPO, upload.id, digest_of(data), "", data, 0))
    assert gw.calls() == ["links.get_session", "links.lease", "blobs.write", "links.link"]
    assert gw.links.leases == {}


def test_a_commit_finished_by_its_retry_takes_a_new_lease() -> None:
    """The recovery path (the bytes became a blob, the link failed): the retry leases the
    digest before it looks for the bytes in the store, then links with that lease."""
    gw, data = gateway(), b"committed, then linksvc went away"
    upload = run(gw.uploads.start(REPO))
    run(gw.uploads.write(REPO, upload.id, 0, data, incoming()))
    gw.links.failures.plan("link", unavailable("linksvc went away"))
    commit = gw.uploads.commit
    raised(Code.UNAVAILABLE, Reason.UNAVAILABLE, commit(REPO, upload.id, digest_of(data), ""))
    # The first attempt gave its lease back (its link failed).
    assert gw.calls()[-2:] == ["links.link", "links.release_lease"]
    assert gw.links.leases == {}
    assert run(commit(REPO, upload.id, digest_of(data), "")).size == len(data)
    calls = gw.calls()
    assert sorted(calls[:2]) == ["blobs.upload_size", "links.get_session"]
    assert calls[2:] == ["links.lease", "blobs.commit", "blobs.stat", "links.link"]
    assert gw.links.sessions[upload.id].state is SessionState.COMMITTED
    assert gw.links.leases == {}  # consumed by the link


def test_a_commit_of_an_upload_unknown_here_or_finished_takes_no_lease() -> None:
    """The session is checked before the lease: a commit refused for an upload of another
    repository, an unknown one, or a finished one (cancelled; committed with another digest)
    makes no lease at all, so failing commits cannot keep digests from garbage collection."""
    gw = gateway()
    upload = run(gw.uploads.start(REPO))
    cancelled = run(gw.uploads.start(REPO))
    run(gw.uploads.cancel(REPO, cancelled.id))
    committed = run(gw.uploads.start(REPO))
    run(gw.uploads.commit(REPO, committed.id, digest_of(b"c"), "", b"c"))
    gw.calls()
    refused = [
        ("elsewhere/repo", upload.id, b""),
        ("elsewhere/repo", upload.id, b"with data"),
        (REPO, "unknown-upload-id-0123456789abcdef", b""),
        (REPO, cancelled.id, b""),
        (REPO, cancelled.id, b"with data"),
        (REPO, committed.id, b"other"),
    ]
    for repository, upload_id, data in refused:
        raised(
            Code.NOT_FOUND,
            Reason.BLOB_UPLOAD_UNKNOWN,
            gw.uploads.commit(repository, upload_id, digest_of(data), "", data),
        )
        calls = gw.calls()
        assert "links.lease" not in calls and "links.release_lease" not in calls, calls
    assert gw.links.leases == {}
    assert gw.links.recorded.keys() == {str(digest_of(b"c"))}


# --- a call that fails after its lease gives it back ----------------------------------------------


def _released(gw: Gateway) -> list[str]:
    """The calls since the last look, but a push's aborts of its staging (in the background);
    no lease is left."""
    calls = [call for call in gw.calls() if call != "blobs.abort"]
    assert gw.links.leases == {}, calls
    return calls


def forget_all(gw: Gateway) -> None:
    """The blobs a failed link left unrecorded, gone: the next attempt stores them anew."""
    gw.links.recorded.clear()
    gw.blobs.blobs.clear()


def test_every_failure_after_the_lease_releases_it_and_success_never_does() -> None:
    """Each path that leases, failing at each step between its lease and its link: the lease is
    released (ReleaseLease) before the error goes on, unchanged; the successes of the same
    paths (the exact call lists above) release nothing, their link consumes the lease."""
    gw, data = gateway(), b"fails after its lease"
    digest, down = digest_of(data), unavailable("away")

    async def settle(coro: Coroutine[Any, Any, Any]) -> LinkedBlobError:
        with pytest.raises(LinkedBlobError) as exc_info:
            await coro
        await settled()  # the background aborts of a push's staging
        return exc_info.value

    def fails(coro: Coroutine[Any, Any, Any], code: grpc.StatusCode, reason: str) -> list[str]:
        err = run(settle(coro))
        assert (err.code, err.reason) == (code, reason), err
        return _released(gw)

    unavailable_ = (Code.UNAVAILABLE, Reason.UNAVAILABLE)
    # PutBlob: blobsvc's put fails; the link fails.
    gw.blobs.failures.plan("put", down)
    assert fails(gw.registry.put(REPO, "", None, data), *unavailable_) == [
        "links.lease", "blobs.put", "links.release_lease"
    ]  # fmt: skip
    gw.links.failures.plan("link", down)
    assert fails(gw.registry.put(REPO, "", None, data), *unavailable_) == [
        "links.lease", "blobs.put", "links.link", "links.release_lease"
    ]  # fmt: skip
    forget_all(gw)

    # PushBlob with a digest: the data is not what the header said (size, digest); the link
    # fails.
    push = gw.registry.push
    assert fails(push(REPO, "", digest, 2, incoming(data)), Code.INVALID_ARGUMENT,
                 Reason.SIZE_INVALID)[-1] == "links.release_lease"  # fmt: skip
    assert fails(push(REPO, "", digest, None, incoming(b"other")), Code.INVALID_ARGUMENT,
                 Reason.DIGEST_INVALID)[-1] == "links.release_lease"  # fmt: skip
    gw.links.failures.plan("link", down)
    calls = fails(push(REPO, "", digest, None, incoming(data)), *unavailable_)
    assert calls[:4] == ["links.lease", "blobs.write", "links.link", "links.release_lease"]
    forget_all(gw)

    # PushBlob without a digest: the commit fails; the link fails. (A failure before the lease
    # has nothing to release.)
    gw.blobs.failures.plan("commit", down)
    calls = fails(push(REPO, "", None, None, incoming(data)), *unavailable_)
    assert calls[:4] == ["blobs.write", "links.lease", "blobs.commit", "links.release_lease"]
    gw.links.failures.plan("link", down)
    calls = fails(push(REPO, "", None, None, incoming(data)), *unavailable_)
    assert calls[:5] == [
        "blobs.write", "links.lease", "blobs.commit", "links.link", "links.release_lease"
    ]  # fmt: skip
    forget_all(gw)
    calls = fails(push(REPO, "", None, 4, incoming(data)), Code.INVALID_ARGUMENT,
                  Reason.SIZE_INVALID)  # fmt: skip
    assert "links.lease" not in calls and "links.release_lease" not in calls

    # CommitUpload: recording directly written bytes fails; the commit fails (a wrong offset
    # with the last chunk, bytes of another digest); the link fails.
    upload = run(gw.uploads.start(REPO))
    run(gw.blobs.write(upload.id, 0, data[:5]))
    commit = gw.uploads.commit
    gw.links.failures.plan("advance_session", down)
    assert fails(commit(REPO, upload.id, digest, ""), *unavailable_)[-3:] == [
        "links.lease", "links.advance_session", "links.release_lease"
    ]  # fmt: skip
    assert fails(commit(REPO, upload.id, digest, "", data[5:], 3), Code.OUT_OF_RANGE,
                 Reason.BLOB_UPLOAD_INVALID)[-3:] == [
        "links.lease", "blobs.write", "links.release_lease"
    ]  # fmt: skip
    assert fails(commit(REPO, upload.id, digest, ""), Code.INVALID_ARGUMENT,
                 Reason.DIGEST_INVALID)[-4:] == [
        "links.lease", "links.advance_session", "blobs.commit", "links.release_lease"
    ]  # fmt: skip
    run(gw.blobs.write(upload.id, 5, data[5:]))
    gw.links.failures.plan("link", down)
    assert fails(commit(REPO, upload.id, digest, ""), *unavailable_)[-5:] == [
        "links.lease", "links.advance_session", "blobs.commit", "links.link",
        "links.release_lease",
    ]  # fmt: skip
    # The upload is as it was for the retry, which finishes the job (and releases nothing).
    assert gw.links.sessions[upload.id].state is SessionState.ACTIVE
    assert run(commit(REPO, upload.id, digest, "")).size == len(data)
    assert "links.release_lease" not in gw.calls()
    assert gw.links.leases == {}


def test_a_release_that_fails_leaves_the_error_as_it_was_and_the_lease_to_expire() -> None:
    gw, data = gateway(ttl=60.0), b"the release fails too"
    gw.blobs.failures.plan("put", aborted(Reason.BLOB_UPLOAD_INVALID, "the put failed"))
    gw.links.failures.plan("release_lease", unavailable("linksvc went away"))
    err = raised(Code.ABORTED, Reason.BLOB_UPLOAD_INVALID, gw.registry.put(REPO, "", None, data))
    assert err.message == "the put failed"
    assert gw.calls() == ["links.lease", "blobs.put", "links.release_lease"]
    assert len(gw.links.leases) == 1  # left to expire, as before there was a release
    # The same with a release that hangs: given up after its timeout, the error unchanged.
    gw.links.leases.clear()

    async def hangs() -> None:
        await asyncio.Event().wait()

    async def scenario() -> LinkedBlobError:
        release = gw.links.release_lease

        async def slow(digest: str, lease_id: str) -> bool:
            await hangs()
            return await release(digest, lease_id)

        gw.links.release_lease = slow  # type: ignore[method-assign]
        gw.blobs.failures.plan("put", unavailable("blobsvc went away"))
        with pytest.raises(LinkedBlobError) as exc_info:
            await gw.registry.put(REPO, "", None, data)
        return exc_info.value

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("gateway.leases.RELEASE_TIMEOUT", 0.05)
        assert run(scenario()).reason == Reason.UNAVAILABLE
    assert len(gw.links.leases) == 1


def test_a_push_whose_caller_goes_away_still_gives_its_lease_back() -> None:
    """The handler is cancelled (the client went away) while the data is relayed: the release
    runs all the same, in a task of its own."""
    gw, data = gateway(), b"abandoned"
    arrived = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield wire.data_message(transport.PUSH_BLOB_DATA, data[:3])
        arrived.set()
        await asyncio.Event().wait()

    async def scenario() -> None:
        stream = IncomingData(
            stalls(), transport.PUSH_BLOB_DATA, bytes, "test", validation.data_size
        )
        task = asyncio.ensure_future(gw.registry.push(REPO, "", digest_of(data), None, stream))
        await arrived.wait()
        assert len(gw.links.leases) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settled()

    run(scenario())
    assert gw.links.leases == {}
    calls = gw.calls()
    assert calls[:2] == ["links.lease", "blobs.write"] and "links.release_lease" in calls


def test_a_lease_granted_after_its_caller_went_away_is_released() -> None:
    """The handler is cancelled while linksvc grants the lease: the lease, once granted, is
    released (nothing is committed: the put never reaches blobsvc)."""
    gw, data = gateway(), b"granted too late"
    asked, answer = asyncio.Event(), asyncio.Event()
    lease = gw.links.lease

    async def slow(*args: Any) -> Any:
        asked.set()
        await answer.wait()
        return await lease(*args)

    async def scenario() -> None:
        gw.links.lease = slow  # type: ignore[method-assign]
        task = asyncio.ensure_future(gw.registry.put(REPO, "", None, data))
        await asked.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        answer.set()
        await settled()

    run(scenario())
    assert gw.calls() == ["links.lease", "links.release_lease"]
    assert gw.links.leases == {} and gw.blobs.blobs == {}


# --- marked blobs are revived -------------------------------------------------------------------


def test_put_push_and_mount_revive_a_marked_blob() -> None:
    gw, data = gateway(), b"unlinked, then marked"
    digest = record(gw, data)
    gw.links.states[digest] = BlobState.MARKED
    assert run(gw.registry.put(REPO, "", None, data)).digest == digest
    assert gw.links.states[digest] is BlobState.ACTIVE
    assert gw.calls() == ["links.lease"]

    gw.links.states[digest] = BlobState.MARKED
    run(gw.registry.push("push/repo", "", digest_of(data), None, unread()))
    assert gw.links.states[digest] is BlobState.ACTIVE

    gw.links.states[digest] = BlobState.MARKED
    run(gw.registry.mount("mount/repo", REPO, digest_of(data), ""))
    assert gw.links.states[digest] is BlobState.ACTIVE

    # A commit's lease revives it too, before the bytes are committed.
    gw.links.states[digest] = BlobState.MARKED
    upload = run(gw.uploads.start("upload/repo"))
    run(gw.uploads.commit("upload/repo", upload.id, digest_of(data), "", data))
    assert gw.links.states[digest] is BlobState.ACTIVE


# --- blobs being deleted ------------------------------------------------------------------------


def test_put_and_push_of_a_blob_being_deleted_retry_then_answer_blob_deleting() -> None:
    gw, data = gateway(), b"being deleted"
    digest = record(gw, data)
    del gw.links.links["other/repo", digest]
    gw.links.states[digest] = BlobState.DELETING
    attempts = len(BACKOFF) + 1
    raised(Code.ABORTED, Reason.BLOB_DELETING, gw.registry.put(REPO, "", None, data))
    assert gw.calls() == ["links.lease"] * attempts
    raised(
        Code.ABORTED,
        Reason.BLOB_DELETING,
        gw.registry.push(REPO, "", digest_of(data), None, unread()),
    )
    assert gw.calls() == ["links.lease"] * attempts

    async def undeclared() -> None:
        with pytest.raises(LinkedBlobError) as exc_info:
            await gw.registry.push(REPO, "", None, None, incoming(data))
        assert exc_info.value.reason == Reason.BLOB_DELETING
        await settled()

    run(undeclared())
    assert gw.calls() == ["blobs.write", *["links.lease"] * attempts, "blobs.abort", "blobs.abort"]
    assert gw.blobs.staged == {}
    # A commit too; the upload stays as it was (staged, active).
    upload = run(gw.uploads.start(REPO))
    run(gw.blobs.write(upload.id, 0, data))
    raised(
        Code.ABORTED,
        Reason.BLOB_DELETING,
        gw.uploads.commit(REPO, upload.id, digest_of(data), ""),
    )
    assert gw.links.sessions[upload.id].state is SessionState.ACTIVE
    assert bytes(gw.blobs.staged[upload.id]) == data
    assert (REPO, digest) not in gw.links.links


def test_a_deletion_that_finishes_while_the_gateway_waits_is_uploaded_again() -> None:
    gw, data = gateway(), b"deleted during the retries"
    digest = record(gw, data)
    del gw.links.links["other/repo", digest]
    gw.links.states[digest] = BlobState.DELETING

    def collector_finishes() -> None:
        del gw.blobs.blobs[digest]
        gw.links.collect(digest)

    gw.links.failures.before("lease", lambda: None)
    gw.links.failures.before("lease", collector_finishes)  # at the second attempt
    assert run(gw.registry.put(REPO, "", None, data)).digest == digest
    assert gw.calls() == ["links.lease", "links.lease", "blobs.put", "links.link"]
    assert gw.blobs.blobs[digest] == data and gw.links.states[digest] is BlobState.ACTIVE


def test_a_link_refused_as_deleting_is_retried() -> None:
    gw, data = gateway(), b"link refused twice"
    gw.links.failures.plan("link", aborted(Reason.BLOB_DELETING, "being deleted"), times=2)
    run(gw.registry.put(REPO, "", None, data))
    assert gw.calls() == ["links.lease", "blobs.put", "links.link", "links.link", "links.link"]


# --- leases that expire -------------------------------------------------------------------------


def test_a_lease_that_expired_before_the_link_is_answered_upload_again() -> None:
    gw, data = gateway(ttl=60.0), b"slow commit"
    gw.blobs.failures.before("put", lambda: gw.clock.advance(61))
    err = raised(Code.ABORTED, Reason.BLOB_UPLOAD_INVALID, gw.registry.put(REPO, "", None, data))
    assert "lease expired" in err.message
    # Not retried; the expired lease is given back (linksvc would have swept it).
    assert gw.calls() == ["links.lease", "blobs.put", "links.link", "links.release_lease"]
    assert gw.links.recorded == {} and gw.links.links == {}

    gw.blobs.failures.before("write", lambda: gw.clock.advance(61))
    raised(
        Code.ABORTED,
        Reason.BLOB_UPLOAD_INVALID,
        gw.registry.push(REPO, "", digest_of(data), None, incoming(data)),
    )
    gw.blobs.failures.before("commit", lambda: gw.clock.advance(61))
    raised(
        Code.ABORTED,
        Reason.BLOB_UPLOAD_INVALID,
        gw.registry.push(REPO, "", None, None, incoming(data)),
    )
    upload = run(gw.uploads.start(REPO))
    run(gw.blobs.write(upload.id, 0, data))
    gw.blobs.failures.before("commit", lambda: gw.clock.advance(61))
    raised(
        Code.ABORTED,
        Reason.BLOB_UPLOAD_INVALID,
        gw.uploads.commit(REPO, upload.id, digest_of(data), ""),
    )
    assert gw.links.sessions[upload.id].state is SessionState.ACTIVE
    assert gw.links.recorded == {} and gw.links.links == {}
    # Within the TTL all goes through.
    assert run(gw.registry.put(REPO, "", None, data)).size == len(data)


def test_a_link_with_another_digests_lease_is_refused() -> None:
    gw = gateway()
    lease = run(gw.links.lease(str(digest_of(b"a")), 60))
    assert not isinstance(lease, LinkedBlob)
    raised(
        Code.ABORTED,
        Reason.BLOB_UPLOAD_INVALID,
        gw.links.link(REPO, str(digest_of(b"b")), "", 1, lease_id=lease.id),
    )
    raised(
        Code.ABORTED, Reason.BLOB_UPLOAD_INVALID, gw.links.link(REPO, str(digest_of(b"b")), "", 1)
    )
    assert gw.links.leases.keys() == {lease.id}


# --- cancel ---------------------------------------------------------------------------------------


def test_cancel_finishes_the_session_first_and_drops_the_bytes_best_effort() -> None:
    gw = gateway()
    upload = run(gw.uploads.start(REPO))
    run(gw.uploads.write(REPO, upload.id, 0, b"abc", incoming()))
    gw.calls()
    gw.blobs.failures.plan("abort", unavailable("blobsvc is away"))
    run(gw.uploads.cancel(REPO, upload.id))  # OK all the same
    assert gw.calls() == ["links.get_session", "links.finish_session", "blobs.abort"]
    assert gw.links.sessions[upload.id].state is SessionState.CANCELLED
    assert gw.blobs.staged[upload.id] == bytearray(b"abc")  # left to the purge
    # Cancelled again (a retry): OK, and the bytes go this time.
    run(gw.uploads.cancel(REPO, upload.id))
    assert gw.calls() == ["links.get_session", "blobs.abort"]
    assert gw.blobs.staged == {}
    raised(Code.NOT_FOUND, Reason.BLOB_UPLOAD_UNKNOWN, gw.uploads.cancel("else/where", upload.id))
    # A committed upload cannot be cancelled.
    done = run(gw.uploads.start(REPO))
    run(gw.uploads.commit(REPO, done.id, digest_of(b"x"), "", b"x"))
    raised(Code.NOT_FOUND, Reason.BLOB_UPLOAD_UNKNOWN, gw.uploads.cancel(REPO, done.id))
