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
import secrets
import time
from collections import Counter
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from grpc import StatusCode  # the codes of LinkedBlobError

from gateway.backends import BlobBackend, LinkBackend
from gateway.model import (
    BlobDescriptor,
    CommitSpec,
    IncomingData,
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
    """Failures planned by a test: the next calls of a method raise instead of acting."""

    def __init__(self) -> None:
        self._planned: dict[str, list[LinkedBlobError]] = {}
        self.calls: Counter[str] = Counter()  # calls made, by method (failed ones too)

    def plan(self, method: str, error: LinkedBlobError, times: int = 1) -> None:
        self._planned.setdefault(method, []).extend([error] * times)

    def check(self, method: str) -> None:
        self.calls[method] += 1
        planned = self._planned.get(method)
        if planned:
            raise planned.pop(0)


def _unknown_blob(digest: str) -> LinkedBlobError:
    return not_found(Reason.BLOB_UNKNOWN, f"blob {digest} is unknown")


def _unknown_upload(upload_id: str) -> LinkedBlobError:
    return not_found(Reason.BLOB_UPLOAD_UNKNOWN, f"upload {upload_id} is unknown")


class FakeBlobBackend:
    """blobsvc in memory: ``blobs`` by digest, ``staged`` bytes by upload id."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.staged: dict[str, bytearray] = {}
        self.failures = Failures()

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
            return Written(len(staged))
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


class FakeLinkBackend:
    """linksvc in memory: ``recorded`` blob sizes, ``links`` (repository, digest) -> media
    type, and ``sessions`` by id."""

    def __init__(self) -> None:
        self.recorded: dict[str, int] = {}
        self.links: dict[tuple[str, str], str] = {}
        self.sessions: dict[str, UploadSession] = {}
        self.failures = Failures()

    async def stat_blob(self, digest: str) -> BlobDescriptor:
        self.failures.check("stat_blob")
        if digest not in self.recorded:
            raise _unknown_blob(digest)
        return BlobDescriptor(digest, self.recorded[digest])

    async def link(
        self,
        repository: str,
        digest: str,
        media_type: str,
        size: int | None = None,
        finish_session: str = "",
    ) -> LinkedBlob:
        self.failures.check("link")
        recorded = self.recorded.get(digest)
        if recorded is None and size is None:
            raise _unknown_blob(digest)
        if recorded is not None and size is not None and size != recorded:
            raise failed_precondition(
                Reason.SIZE_INVALID, f"{digest} is {recorded} bytes, not {size}", size=recorded
            )
        if finish_session:  # checked first: all of it is one transaction in linksvc
            self._finish(finish_session, SessionState.COMMITTED, repository)
        if recorded is None:
            assert size is not None
            recorded = self.recorded[digest] = size
        key = (repository, digest)
        self.links[key] = media_type or self.links.get(key, "")
        return LinkedBlob(digest, recorded, self.links[key])

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
        sources = [source] if source else sorted(r for r, d in self.links if d == digest)
        found = [s for s in sources if (s, digest) in self.links]
        if not found:
            raise _unknown_blob(digest)
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

    def _finish(self, upload_id: str, state: SessionState, repository: str = "") -> None:
        session = self.sessions.get(upload_id)
        if session is None or (repository and session.repository != repository):
            raise _unknown_upload(upload_id)
        if session.state is state:  # finishing twice the same way is a no-op
            return
        if session.state is not SessionState.ACTIVE:
            raise failed_precondition(
                Reason.BLOB_UPLOAD_INVALID, f"upload session {upload_id} is already finished"
            )
        self.sessions[upload_id] = dataclasses.replace(session, state=state)

    def forget(self, repository: str, digest: str) -> None:
        pass  # nothing is remembered beyond the state itself


if TYPE_CHECKING:  # mypy checks the fakes against the interfaces they stand in for
    _blobs: BlobBackend = FakeBlobBackend()
    _links: LinkBackend = FakeLinkBackend()
