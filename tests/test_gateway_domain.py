"""Unit tests of the gateway's domain (gateway.registry, gateway.uploads) on the in-memory
backends (gateway.fakes), with no gRPC server: the ordinary paths, and the recovery paths that
end-to-end tests cannot reach on purpose (staged bytes gone while a session is active, a backend
failing between the commit and the link, a lost race on the session's size)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest

from gateway import validation
from gateway.fakes import FakeBlobBackend, FakeLinkBackend
from gateway.linkcache import CachedLinks, LinkCache
from gateway.model import IncomingData, LinkedBlob, OutgoingData, SessionState
from gateway.registry import Registry
from gateway.uploads import Uploads
from linkedblob import transport, wire
from linkedblob.config import MAX_CHUNK_BYTES
from linkedblob.digests import Digest
from linkedblob.errors import LinkedBlobError, Reason, aborted, unavailable
from linkedblob.v1 import registry_pb2

Code = grpc.StatusCode
T = TypeVar("T")
REPO = "domain/repo"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def digest_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


@dataclass
class Gateway:
    blobs: FakeBlobBackend
    links: FakeLinkBackend
    cache: LinkCache[LinkedBlob]
    registry: Registry
    uploads: Uploads


def gateway(*, enable_delete: bool = True, abort_again_after: float = 2.0) -> Gateway:
    blobs, links = FakeBlobBackend(), FakeLinkBackend()
    cache: LinkCache[LinkedBlob] = LinkCache(60.0, 100)
    cached = CachedLinks(links, cache)
    return Gateway(
        blobs,
        links,
        cache,
        Registry(blobs, cached, enable_delete=enable_delete, abort_again_after=abort_again_after),
        Uploads(blobs, cached),
    )


async def _messages(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield wire.data_message(transport.WRITE_UPLOAD_DATA, chunk)


def incoming(*chunks: bytes) -> IncomingData:
    def parse(raw: bytes) -> bytes:
        return registry_pb2.WriteUploadRequest.FromString(raw).data

    return IncomingData(
        _messages(list(chunks)), transport.WRITE_UPLOAD_DATA, parse, "test", validation.data_size
    )


async def read(gw: Gateway, digest: Digest, offset: int = 0, length: int = 0) -> bytes:
    blob = await gw.registry.stat(REPO, str(digest))
    out = OutgoingData(transport.READ_BLOB_DATA, b"", "test")
    chunks = await gw.registry.read(REPO, blob, offset, length, out)
    if chunks is None:
        return b""
    field = transport.READ_BLOB_DATA
    return b"".join([bytes(wire.data_payload(m, field) or b"") async for m in chunks])


def raised(code: grpc.StatusCode, reason: str, coro: Coroutine[Any, Any, Any]) -> dict[str, str]:
    """Runs ``coro``, which must fail with ``code`` and ``reason``; the error's metadata."""
    with pytest.raises(LinkedBlobError) as exc_info:
        run(coro)
    assert (exc_info.value.code, exc_info.value.reason) == (code, reason), exc_info.value
    return exc_info.value.metadata


# --- blobs through links -------------------------------------------------------------------------


def test_push_then_read_ranges() -> None:
    gw, data = gateway(), b"0123456789" * 100

    async def scenario() -> None:
        linked = await gw.registry.push(REPO, "text/plain", None, len(data), incoming(data))
        assert linked == LinkedBlob(str(digest_of(data)), len(data), "text/plain")
        assert await read(gw, digest_of(data)) == data
        assert await read(gw, digest_of(data), 990, 0) == data[990:]
        assert await read(gw, digest_of(data), 5, 3) == data[5:8]
        assert await read(gw, digest_of(data), len(data)) == b""

    run(scenario())
    meta = raised(Code.OUT_OF_RANGE, Reason.RANGE_INVALID, read(gw, digest_of(data), 1001))
    assert meta == {"size": "1000"}


def test_a_push_of_a_recorded_blob_links_it_without_reading() -> None:
    gw, data = gateway(), b"recorded"
    run(gw.registry.put("other/repo", "", None, data))

    async def never() -> AsyncIterator[bytes]:
        raise AssertionError("the data was read")
        yield b""  # an async generator

    unread = IncomingData(never(), transport.PUSH_BLOB_DATA, bytes, "test", validation.data_size)
    linked = run(gw.registry.push(REPO, "", digest_of(data), None, unread))
    assert linked.size == len(data) and gw.links.links[REPO, linked.digest] == ""
    meta = raised(
        Code.INVALID_ARGUMENT,
        Reason.SIZE_INVALID,
        gw.registry.push(REPO, "", digest_of(data), 3, unread),
    )
    assert meta == {"size": str(len(data))}


def test_a_failed_push_drops_its_staging_area() -> None:
    gw = gateway(abort_again_after=0.01)

    async def scenario() -> None:
        claimed = digest_of(b"something else")
        with pytest.raises(LinkedBlobError) as exc_info:
            await gw.registry.push(REPO, "", claimed, None, incoming(b"these bytes"))
        assert exc_info.value.reason == Reason.DIGEST_INVALID
        await asyncio.sleep(0.05)  # both aborts ran

    run(scenario())
    assert gw.blobs.staged == {} and gw.blobs.failures.calls["abort"] == 2
    assert gw.links.links == {}


def test_a_read_of_a_blob_gone_from_the_store_forgets_the_link() -> None:
    gw, data = gateway(), b"soon gone"
    run(gw.registry.put(REPO, "", None, data))
    run(gw.registry.stat(REPO, str(digest_of(data))))
    assert gw.links.failures.calls["resolve"] == 0  # the link, as Put made it, is cached
    del gw.blobs.blobs[str(digest_of(data))]
    raised(Code.NOT_FOUND, Reason.BLOB_UNKNOWN, read(gw, digest_of(data)))
    run(gw.registry.stat(REPO, str(digest_of(data))))
    assert gw.links.failures.calls["resolve"] == 1  # asked linksvc again


def test_a_data_message_over_the_limit_is_refused_as_it_is_taken() -> None:
    """The servicer's limit (IncomingData.check_size) applies to every relayed message, on
    whichever backend takes them."""
    gw = gateway()
    upload = run(gw.uploads.start(REPO))
    too_big = b"x" * (MAX_CHUNK_BYTES + 1)
    meta = raised(
        Code.RESOURCE_EXHAUSTED,
        Reason.SIZE_INVALID,
        gw.uploads.write(REPO, upload.id, 0, b"ok", incoming(b"fine", too_big)),
    )
    assert meta == {"limit": str(MAX_CHUNK_BYTES)}


def test_the_link_cache_rules_around_the_link_backend() -> None:
    gw, data = gateway(), b"cached"
    digest = str(digest_of(data))
    run(gw.registry.put(REPO, "text/plain", None, data))
    run(gw.registry.mount("copy/repo", REPO, digest_of(data), ""))
    for _ in range(3):
        run(gw.registry.stat(REPO, digest))
        run(gw.registry.mount("copy/repo", REPO, digest_of(data), ""))
    assert (gw.links.failures.calls["resolve"], gw.links.failures.calls["mount"]) == (0, 1)
    # A delete drops the entry even when the unlink fails.
    gw.links.failures.plan("unlink", unavailable("linksvc went away"))
    raised(Code.UNAVAILABLE, Reason.UNAVAILABLE, gw.registry.delete(REPO, digest_of(data)))
    assert gw.cache.get(REPO, digest) is None
    run(gw.registry.delete(REPO, digest_of(data)))
    raised(Code.NOT_FOUND, Reason.BLOB_UNKNOWN, gw.registry.stat(REPO, digest))
    off = gateway(enable_delete=False)
    raised(Code.FAILED_PRECONDITION, Reason.UNSUPPORTED, off.registry.delete(REPO, digest_of(data)))


# --- uploads -------------------------------------------------------------------------------------


def test_wrong_offsets_answer_the_staged_size() -> None:
    gw = gateway()
    upload = run(gw.uploads.start(REPO))
    meta = raised(
        Code.OUT_OF_RANGE,
        Reason.BLOB_UPLOAD_INVALID,
        gw.uploads.write(REPO, upload.id, 5, b"late", incoming()),
    )
    assert meta == {"size": "0"}  # never written: at 0, as GetUpload says
    meta = raised(
        Code.OUT_OF_RANGE,
        Reason.BLOB_UPLOAD_INVALID,
        gw.uploads.commit(REPO, upload.id, digest_of(b"late"), "", b"late", 5),
    )
    assert meta == {"size": "0"}
    _, size = run(gw.uploads.write(REPO, upload.id, 0, b"abc", incoming(b"de")))
    assert size == 5 and gw.links.sessions[upload.id].size == 5
    meta = raised(
        Code.OUT_OF_RANGE,
        Reason.BLOB_UPLOAD_INVALID,
        gw.uploads.write(REPO, upload.id, 3, b"x", incoming()),
    )
    assert meta == {"size": "5"}
    raised(
        Code.NOT_FOUND,
        Reason.BLOB_UPLOAD_UNKNOWN,
        gw.uploads.write("another/repo", upload.id, 5, b"f", incoming()),
    )


def test_a_commit_stopped_before_the_link_is_finished_by_its_retry() -> None:
    gw, data = gateway(), b"committed, then linksvc went away"
    upload = run(gw.uploads.start(REPO))
    run(gw.uploads.write(REPO, upload.id, 0, data, incoming()))
    gw.links.failures.plan("link", unavailable("linksvc went away"))
    commit = gw.uploads.commit
    raised(Code.UNAVAILABLE, Reason.UNAVAILABLE, commit(REPO, upload.id, digest_of(data), ""))
    # The bytes are a blob now, the session still active, no link made.
    assert upload.id not in gw.blobs.staged and str(digest_of(data)) in gw.blobs.blobs
    assert gw.links.sessions[upload.id].state is SessionState.ACTIVE
    linked = run(commit(REPO, upload.id, digest_of(data), "text/plain"))
    assert linked == LinkedBlob(str(digest_of(data)), len(data), "text/plain")
    assert gw.links.sessions[upload.id].state is SessionState.COMMITTED
    # Retried once more (its answer lost): answered from the link.
    assert run(commit(REPO, upload.id, digest_of(data), "text/plain")) == linked
    raised(Code.NOT_FOUND, Reason.BLOB_UPLOAD_UNKNOWN, commit(REPO, upload.id, digest_of(b"x"), ""))


def test_a_retried_commit_asks_linksvc_not_the_cache() -> None:
    """A retried commit of a committed session answers from the link as linksvc has it: an
    entry the cache still holds (the link deleted through another gateway) is no success."""
    gw, data = gateway(), b"committed, then unlinked elsewhere"
    upload = run(gw.uploads.start(REPO))
    run(gw.uploads.write(REPO, upload.id, 0, data, incoming()))
    linked = run(gw.uploads.commit(REPO, upload.id, digest_of(data), ""))
    assert gw.cache.get(REPO, linked.digest) == linked  # the commit's link is cached
    resolved = gw.links.failures.calls["resolve"]
    assert run(gw.uploads.commit(REPO, upload.id, digest_of(data), "")) == linked
    assert gw.links.failures.calls["resolve"] == resolved + 1
    del gw.links.links[REPO, linked.digest]  # unlinked through another gateway
    assert gw.cache.get(REPO, linked.digest) == linked  # still cached here
    raised(
        Code.NOT_FOUND,
        Reason.BLOB_UPLOAD_UNKNOWN,
        gw.uploads.commit(REPO, upload.id, digest_of(data), ""),
    )


def test_bytes_written_directly_are_recorded_before_the_commit_moves_them() -> None:
    gw, data = gateway(), b"written to blobsvc with a grant"
    upload = run(gw.uploads.start(REPO))
    gw.blobs.staged[upload.id] = bytearray(data)  # the session never heard of them
    gw.links.failures.plan("link", unavailable("linksvc went away"))
    commit = gw.uploads.commit
    raised(Code.UNAVAILABLE, Reason.UNAVAILABLE, commit(REPO, upload.id, digest_of(data), ""))
    assert gw.links.sessions[upload.id].size == len(data)
    assert run(commit(REPO, upload.id, digest_of(data), "")).size == len(data)


def test_staged_bytes_gone_while_the_session_is_active() -> None:
    gw, data = gateway(), b"hello"
    upload = run(gw.uploads.start(REPO))
    run(gw.uploads.write(REPO, upload.id, 0, data, incoming()))
    del gw.blobs.staged[upload.id]  # purged, say: no commit stored them
    commit = gw.uploads.commit
    raised(Code.NOT_FOUND, Reason.BLOB_UPLOAD_UNKNOWN, commit(REPO, upload.id, digest_of(data), ""))
    # The store holding the digest at another size than the session wrote proves nothing.
    run(gw.blobs.put(b"abc", ""))
    raised(
        Code.NOT_FOUND, Reason.BLOB_UPLOAD_UNKNOWN, commit(REPO, upload.id, digest_of(b"abc"), "")
    )
    assert gw.links.sessions[upload.id].state is SessionState.ACTIVE
    assert gw.links.links == {}


def test_an_empty_upload_commits_only_the_empty_blob() -> None:
    gw = gateway()
    upload = run(gw.uploads.start(REPO))
    commit = gw.uploads.commit
    raised(
        Code.INVALID_ARGUMENT, Reason.DIGEST_INVALID, commit(REPO, upload.id, digest_of(b"x"), "")
    )
    assert run(commit(REPO, upload.id, digest_of(b""), "")).size == 0


def test_a_write_that_loses_the_race_for_the_session_size_retries_from_the_winners() -> None:
    gw = gateway()
    upload = run(gw.uploads.start(REPO))
    gw.links.failures.plan("advance_session", aborted(Reason.BLOB_UPLOAD_INVALID, "lost", size=2))
    run(gw.uploads.write(REPO, upload.id, 0, b"abcd", incoming()))
    # 0 -> 4 lost (to "2"), 2 -> 4 lost (it is 0 really), 0 -> 4 won.
    assert gw.links.failures.calls["advance_session"] == 3
    assert gw.links.sessions[upload.id].size == 4
    session, staged = run(gw.uploads.status(REPO, upload.id))
    assert (session.id, staged) == (upload.id, 4)


def test_cancel_ends_the_session_and_drops_the_bytes() -> None:
    gw = gateway()
    upload = run(gw.uploads.start(REPO))
    run(gw.uploads.write(REPO, upload.id, 0, b"abc", incoming()))
    run(gw.uploads.cancel(REPO, upload.id))
    assert gw.blobs.staged == {}
    assert gw.links.sessions[upload.id].state is SessionState.CANCELLED
    raised(Code.NOT_FOUND, Reason.BLOB_UPLOAD_UNKNOWN, gw.uploads.status(REPO, upload.id))
