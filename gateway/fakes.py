"""In-memory BlobBackend and LinkBackend: honest implementations of gateway.backends, for tests.

They keep blobs, staging areas, links and sessions in dicts and answer with the codes and
reasons blobsvc and linksvc answer with, so the domain (gateway.registry, gateway.uploads) runs
on them as on the services. What a test cannot provoke through real services on purpose it sets
up directly: it edits the state (staged bytes gone while a session is active, a blob cut short
in the store), or plans failures (:class:`Failures`: the next call of a method fails, as when a
backend goes away between two steps).

Here, not under tests/, so that mypy checks them against the interfaces they implement, and so
that other work (a benchmark of the domain, another front end) can use them.
"""

from __future__ import annotations

import dataclasses
import enum
import secrets
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING

from grpc import StatusCode  # the codes of LinkedBlobError

from gateway.backends import BlobBackend, LinkBackend
from gateway.model import (
    BlobDescriptor,
    CommitSpec,
    IncomingData,
    Lease,
    LinkedBlob,
    OutgoingData,
    Page,
    SessionState,
    UploadSession,
    Written,
)
from linkedblob import paging, wire
from linkedblob.config import STREAM_CHUNK_BYTES
from linkedblob.digests import DEFAULT_ALGORITHM, Digest
from linkedblob.errors import (
    LinkedBlobError,
    Reason,
    aborted,
    failed_precondition,
    invalid_argument,
    not_found,
    out_of_range,
)
from linkedblob.names import validate_repository


class Failures:
    """Failures planned by a test: the next calls of a method raise instead of acting; and
    events: the next call of a method first runs a test's function (a clock moving on, a
    collector acting between two steps). Every call is counted, and written to ``journal``
    (``name.method``, in order; a journal shared by both fakes gives the order of all calls)."""

    def __init__(self, name: str = "", journal: list[str] | None = None) -> None:
        self._planned: dict[str, list[LinkedBlobError]] = {}
        self._before: dict[str, list[Callable[[], None]]] = {}
        self.calls: Counter[str] = Counter()  # calls made, by method (failed ones too)
        self.name = name
        self.journal: list[str] = journal if journal is not None else []

    def plan(self, method: str, error: LinkedBlobError, times: int = 1) -> None:
        self._planned.setdefault(method, []).extend([error] * times)

    def before(self, method: str, event: Callable[[], None]) -> None:
        """Runs ``event`` at the next call of ``method``, before it acts."""
        self._before.setdefault(method, []).append(event)

    def check(self, method: str) -> None:
        self.calls[method] += 1
        self.journal.append(f"{self.name}.{method}" if self.name else method)
        events = self._before.get(method)
        if events:
            events.pop(0)()
        planned = self._planned.get(method)
        if planned:
            raise planned.pop(0)


def _unknown_blob(digest: str) -> LinkedBlobError:
    return not_found(Reason.BLOB_UNKNOWN, f"blob {digest} is unknown")


def _unknown_upload(upload_id: str) -> LinkedBlobError:
    return not_found(Reason.BLOB_UPLOAD_UNKNOWN, f"upload {upload_id} is unknown")


class FakeBlobBackend:
    """blobsvc in memory: ``blobs`` by digest, ``staged`` bytes by upload id."""

    def __init__(self, journal: list[str] | None = None) -> None:
        self.blobs: dict[str, bytes] = {}
        self.staged: dict[str, bytearray] = {}
        self.failures = Failures("blobs", journal)

    async def stat(self, digest: str) -> BlobDescriptor:
        self.failures.check("stat")
        if digest not in self.blobs:
            raise _unknown_blob(digest)
        return BlobDescriptor(digest, len(self.blobs[digest]))

    async def put(self, data: bytes, digest: str, counted_as: str = "") -> BlobDescriptor:
        self.failures.check("put")
        return self._store(data, CommitSpec(digest))

    async def open_read(
        self, digest: str, offset: int, length: int, out: OutgoingData
    ) -> AsyncGenerator[bytes, None]:
        self.failures.check("open_read")
        if digest not in self.blobs:
            raise _unknown_blob(digest)
        return self._read(self.blobs[digest][offset : offset + length], length, out)

    @staticmethod
    async def _read(data: bytes, length: int, out: OutgoingData) -> AsyncGenerator[bytes, None]:
        head = out.head
        for start in range(0, len(data), STREAM_CHUNK_BYTES):
            yield head + wire.data_message(out.data_field, data[start : start + STREAM_CHUNK_BYTES])
            head = b""
        if len(data) != length:
            raise LinkedBlobError(
                StatusCode.DATA_LOSS, Reason.INTERNAL, f"{len(data)} of {length} bytes"
            )
        if head:
            yield head

    async def write(
        self,
        upload_id: str,
        offset: int,
        data: bytes,
        incoming: IncomingData | None = None,
        commit: CommitSpec | None = None,
        counted_as: str = "",
        want_staged_digest: bool = False,
    ) -> Written:
        self.failures.check("write")
        staged = self.staged.get(upload_id)
        if staged is None and offset > 0:
            raise _unknown_upload(upload_id)
        staged = staged if staged is not None else bytearray()
        if offset != len(staged):
            raise out_of_range(
                Reason.BLOB_UPLOAD_INVALID,
                f"upload {upload_id} has {len(staged)} bytes staged; cannot write at {offset}",
                size=len(staged),
            )
        self.staged[upload_id] = staged
        staged += data
        if incoming is not None:
            async for raw in incoming.messages:
                payload = wire.data_payload(raw, incoming.data_field)
                chunk = payload if payload is not None else incoming.parse(raw)
                incoming.check_size(len(chunk))
                staged += chunk
        if commit is None:
            digest = str(Digest.of(bytes(staged))) if want_staged_digest else ""
            return Written(len(staged), staged_digest=digest)
        blob = self._store(bytes(staged), commit)
        del self.staged[upload_id]
        return Written(blob.size, blob)

    async def upload_size(self, upload_id: str) -> int:
        self.failures.check("upload_size")
        if upload_id not in self.staged:
            raise _unknown_upload(upload_id)
        return len(self.staged[upload_id])

    async def commit(self, upload_id: str, digest: str) -> BlobDescriptor:
        self.failures.check("commit")
        if upload_id not in self.staged:
            raise _unknown_upload(upload_id)
        blob = self._store(bytes(self.staged[upload_id]), CommitSpec(digest))
        del self.staged[upload_id]
        return blob

    async def abort(self, upload_id: str) -> None:
        self.failures.check("abort")
        self.staged.pop(upload_id, None)

    def _store(self, data: bytes, spec: CommitSpec) -> BlobDescriptor:
        """Stores ``data`` if it is what ``spec`` expects (as blobsvc checks a commit)."""
        claimed = Digest.parse(spec.digest) if spec.digest else None
        algorithm = claimed.algorithm if claimed else spec.algorithm or DEFAULT_ALGORITHM
        digest = str(Digest.of(data, algorithm))
        if claimed is not None and str(claimed) != digest:
            raise invalid_argument(Reason.DIGEST_INVALID, f"the bytes hash to {digest}")
        if spec.size is not None and spec.size != len(data):
            raise invalid_argument(
                Reason.SIZE_INVALID, f"{len(data)} bytes, not {spec.size}", size=len(data)
            )
        self.blobs[digest] = data
        return BlobDescriptor(digest, len(data))


class BlobState(enum.StrEnum):
    """An indexed blob's state in linksvc (garbage collection moves it)."""

    ACTIVE = "active"
    MARKED = "marked"  # no link and no live lease when the collector last looked
    DELETING = "deleting"  # fenced: the collector is deleting its bytes


class FakeLinkBackend:
    """linksvc in memory: ``recorded`` blob sizes and their ``states``, ``links`` (repository,
    digest) -> media type, ``leases`` by id (digest, expiry on ``clock``), and ``sessions`` by
    id. Link, Lease and Mount follow linksvc's rules: a marked blob is revived, one being
    deleted is ABORTED / BLOB_DELETING, a new blob is recorded only with a live lease of its
    digest (consumed). A test plays the collector by editing ``states`` (and dropping the blob
    with :meth:`collect`)."""

    def __init__(
        self, clock: Callable[[], float] = time.time, journal: list[str] | None = None
    ) -> None:
        self.recorded: dict[str, int] = {}
        self.states: dict[str, BlobState] = {}
        self.links: dict[tuple[str, str], str] = {}
        self.leases: dict[str, tuple[str, float]] = {}
        self.sessions: dict[str, UploadSession] = {}
        self.clock = clock
        self.failures = Failures("links", journal)

    def collect(self, digest: str) -> None:
        """The collector's end of a deletion: the blob's row is gone (ForgetBlob)."""
        del self.recorded[digest]
        del self.states[digest]

    def _lock_live(self, digest: str) -> int | None:
        """The recorded size (None: not recorded); BLOB_DELETING for a blob being deleted.
        Reviving a marked blob is left to the caller, once nothing else can fail."""
        if self.states.get(digest) is BlobState.DELETING:
            raise aborted(
                Reason.BLOB_DELETING, f"blob {digest} is being deleted; retry (upload again)"
            )
        return self.recorded.get(digest)

    def _revive(self, digest: str) -> None:
        if digest in self.states:
            self.states[digest] = BlobState.ACTIVE

    def _live_lease(self, lease_id: str, digest: str) -> bool:
        lease = self.leases.get(lease_id)
        return lease is not None and lease[0] == digest and lease[1] > self.clock()

    async def stat_blob(self, digest: str) -> BlobDescriptor:
        self.failures.check("stat_blob")
        if digest not in self.recorded:
            raise _unknown_blob(digest)
        return BlobDescriptor(digest, self.recorded[digest])

    async def lease(
        self,
        digest: str,
        ttl: float,
        link_repository: str = "",
        media_type: str = "",
        size: int | None = None,
    ) -> Lease | LinkedBlob:
        self.failures.check("lease")
        recorded = self._lock_live(digest)
        if link_repository and recorded is not None:
            if size is not None and size != recorded:
                raise invalid_argument(
                    Reason.SIZE_INVALID,
                    f"blob {digest} is recorded with size {recorded}, not {size}",
                    size=recorded,
                )
            self._revive(digest)
            return self._link(link_repository, digest, media_type)
        self._revive(digest)
        lease_id = secrets.token_urlsafe(24)
        expires = self.clock() + ttl
        self.leases[lease_id] = (digest, expires)
        return Lease(lease_id, int(expires * 1e9))

    async def release_lease(self, digest: str, lease_id: str) -> bool:
        self.failures.check("release_lease")
        lease = self.leases.get(lease_id)
        if lease is None or lease[0] != digest:
            return False
        del self.leases[lease_id]
        return True

    async def link(
        self,
        repository: str,
        digest: str,
        media_type: str,
        size: int | None = None,
        finish_session: str = "",
        lease_id: str = "",
    ) -> LinkedBlob:
        self.failures.check("link")
        # Everything is checked before anything changes: it is one transaction in linksvc.
        recorded = self._lock_live(digest)
        if recorded is None:
            if size is None:
                raise _unknown_blob(digest)
            if not (lease_id and self._live_lease(lease_id, digest)):
                raise aborted(
                    Reason.BLOB_UPLOAD_INVALID,
                    f"no live lease of {digest}: the lease expired; upload again",
                )
        elif size is not None and size != recorded:
            raise failed_precondition(
                Reason.SIZE_INVALID, f"{digest} is {recorded} bytes, not {size}", size=recorded
            )
        if finish_session:
            self._finish(finish_session, SessionState.COMMITTED, repository, check_only=True)
            self._finish(finish_session, SessionState.COMMITTED, repository)
        self.leases.pop(lease_id, None)
        if recorded is None:
            assert size is not None
            self.recorded[digest] = size
            self.states[digest] = BlobState.ACTIVE
        self._revive(digest)
        return self._link(repository, digest, media_type)

    def _link(self, repository: str, digest: str, media_type: str) -> LinkedBlob:
        key = (repository, digest)
        self.links[key] = media_type or self.links.get(key, "")
        return LinkedBlob(digest, self.recorded[digest], self.links[key])

    async def resolve(self, repository: str, digest: str, fresh: bool = False) -> LinkedBlob:
        self.failures.check("resolve")
        if (repository, digest) not in self.links:
            raise _unknown_blob(digest)
        return LinkedBlob(digest, self.recorded[digest], self.links[repository, digest])

    async def unlink(self, repository: str, digest: str) -> None:
        self.failures.check("unlink")
        if self.links.pop((repository, digest), None) is None:
            raise _unknown_blob(digest)

    async def mount(self, repository: str, source: str, digest: str, media_type: str) -> LinkedBlob:
        self.failures.check("mount")
        self._lock_live(digest)
        sources = [source] if source else sorted(r for r, d in self.links if d == digest)
        found = [s for s in sources if (s, digest) in self.links]
        if not found:
            raise _unknown_blob(digest)
        self._revive(digest)
        key = (repository, digest)
        self.links[key] = media_type or self.links.get(key) or self.links[found[0], digest]
        return LinkedBlob(digest, self.recorded[digest], self.links[key])

    async def list_links(
        self, repository: str, page_size: int, page_token: str
    ) -> Page[LinkedBlob]:
        self.failures.check("list_links")
        after = paging.decode_page_token(page_token, "links", repository, Digest.parse)
        digests = sorted(d for r, d in self.links if r == repository and d > after)
        page, more = self._page(digests, page_size)
        blobs = [LinkedBlob(d, self.recorded[d], self.links[repository, d]) for d in page]
        token = paging.encode_page_token("links", repository, page[-1]) if more else ""
        return Page(blobs, token)

    async def list_repositories(self, page_size: int, page_token: str) -> Page[str]:
        self.failures.check("list_repositories")
        after = paging.decode_page_token(page_token, "repositories", "", validate_repository)
        names = sorted({r for r, _ in self.links if r > after})
        page, more = self._page(names, page_size)
        return Page(page, paging.encode_page_token("repositories", "", page[-1]) if more else "")

    async def list_linking_repositories(
        self, digest: str, page_size: int, page_token: str
    ) -> Page[str]:
        self.failures.check("list_linking_repositories")
        after = paging.decode_page_token(page_token, "linking", digest, validate_repository)
        names = sorted(r for r, d in self.links if d == digest and r > after)
        page, more = self._page(names, page_size)
        return Page(page, paging.encode_page_token("linking", digest, page[-1]) if more else "")

    @staticmethod
    def _page(keys: list[str], page_size: int) -> tuple[list[str], bool]:
        size = paging.page_size(page_size)
        return keys[:size], len(keys) > size

    async def create_session(self, repository: str) -> UploadSession:
        self.failures.check("create_session")
        session = UploadSession(
            secrets.token_urlsafe(24), repository, 0, SessionState.ACTIVE, time.time_ns()
        )
        self.sessions[session.id] = session
        return session

    async def list_sessions(
        self, repository: str, page_size: int, page_token: str
    ) -> Page[UploadSession]:
        self.failures.check("list_sessions")
        after = paging.decode_page_token(page_token, "sessions", repository, str)
        ids = sorted(
            s.id
            for s in self.sessions.values()
            if s.repository == repository and s.state is SessionState.ACTIVE and s.id > after
        )
        page, more = self._page(ids, page_size)
        token = paging.encode_page_token("sessions", repository, page[-1]) if more else ""
        return Page([self.sessions[i] for i in page], token)

    async def get_session(self, upload_id: str) -> UploadSession:
        self.failures.check("get_session")
        if upload_id not in self.sessions:
            raise _unknown_upload(upload_id)
        return self.sessions[upload_id]

    async def advance_session(self, upload_id: str, from_size: int, to_size: int) -> None:
        self.failures.check("advance_session")
        session = self.sessions.get(upload_id)
        if session is None or session.state is not SessionState.ACTIVE:
            raise _unknown_upload(upload_id)
        if session.size != from_size:
            raise aborted(
                Reason.BLOB_UPLOAD_INVALID,
                f"session {upload_id} is at {session.size}, not {from_size}",
                size=session.size,
            )
        self.sessions[upload_id] = dataclasses.replace(session, size=to_size)

    async def finish_session(self, upload_id: str, state: SessionState) -> None:
        self.failures.check("finish_session")
        self._finish(upload_id, state)

    def _finish(
        self, upload_id: str, state: SessionState, repository: str = "", check_only: bool = False
    ) -> None:
        session = self.sessions.get(upload_id)
        if session is None or (repository and session.repository != repository):
            raise _unknown_upload(upload_id)
        if session.state is state:  # finishing twice the same way is a no-op
            return
        if session.state is not SessionState.ACTIVE:
            raise failed_precondition(
                Reason.BLOB_UPLOAD_INVALID, f"upload session {upload_id} is already finished"
            )
        if not check_only:
            self.sessions[upload_id] = dataclasses.replace(session, state=state)

    def forget(self, repository: str, digest: str) -> None:
        pass  # nothing is remembered beyond the state itself


if TYPE_CHECKING:  # mypy checks the fakes against the interfaces they stand in for
    _blobs: BlobBackend = FakeBlobBackend()
    _links: LinkBackend = FakeLinkBackend()
