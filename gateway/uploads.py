"""Resumable uploads: a session in linksvc, the bytes staged in blobsvc, and the commit that
turns them into a linked blob.

An upload is used only through the repository that started it (elsewhere it is unknown).
blobsvc's staged size is the truth about the bytes; the session records it too (its size and
last-update time, which stale-upload purging reads), and a commit checks the session, leases
the digest (linksvc: garbage collection keeps its bytes), stores the bytes, then records and
links the blob with the lease and finishes the session in one linksvc transaction; a commit
that fails in between gives its lease back. A commit that stopped in between
(the bytes stored, the link not made) is finished by the next one: see
:meth:`Uploads._commit_staged`.

Callers pass validated values (gateway.validation); failures are LinkedBlobError.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence

from grpc import StatusCode  # the codes of LinkedBlobError

from gateway.backends import BlobBackend, LinkBackend
from gateway.leases import DELETING_BACKOFF, Leases
from gateway.model import (
    BlobDescriptor,
    CommitSpec,
    IncomingData,
    Lease,
    LinkedBlob,
    Page,
    SessionState,
    UploadSession,
    Written,
)
from gateway.options import DEFAULT_LEASE_TTL
from linkedblob.digests import Digest
from linkedblob.errors import LinkedBlobError, Reason, not_found, out_of_range

# How often a write retries linksvc's compare-and-set of the session size after losing a race.
ADVANCE_ATTEMPTS = 4

log = logging.getLogger(__name__)


def unknown_upload(upload_id: str) -> LinkedBlobError:
    return not_found(Reason.BLOB_UPLOAD_UNKNOWN, f"unknown upload {upload_id!r}")


class Uploads:
    def __init__(
        self,
        blobs: BlobBackend,
        links: LinkBackend,
        *,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        deleting_backoff: Sequence[float] = DELETING_BACKOFF,
    ) -> None:
        """``lease_ttl`` and ``deleting_backoff``: see gateway.leases.Leases."""
        self._blobs = blobs
        self._links = links
        self._leases = Leases(links, ttl=lease_ttl, deleting_backoff=deleting_backoff)

    async def start(self, repository: str) -> UploadSession:
        return await self._links.create_session(repository)

    async def in_progress(
        self, repository: str, page_size: int, page_token: str
    ) -> Page[UploadSession]:
        """``repository``'s uploads in progress, in id order, paged, as linksvc records them
        (each one's size as of its last completed write)."""
        return await self._links.list_sessions(repository, page_size, page_token)

    async def prepare_direct(self, session: UploadSession, staged: int = 0) -> None:
        """Makes sure an active upload has a staging area in blobsvc before a write grant for
        it is handed out: a client's grant only appends to one that exists (blobsvc creates
        none for it), so once the upload is committed or cancelled (its staging area gone) the
        grant writes nothing. An empty internal Write at 0 creates it (no descriptor is kept
        open); one with bytes (``staged``, or OUT_OF_RANGE) is left as it is, and so is a
        session that recorded bytes blobsvc no longer stages (an earlier commit stored them
        and stopped before linking: the next commit finishes that, see _commit_staged)."""
        if staged > 0 or session.size > 0:
            return
        try:
            await self._blobs.write(session.id, 0, b"")
        except LinkedBlobError as err:
            if err.code != StatusCode.OUT_OF_RANGE:
                raise

    async def write(
        self, repository: str, upload_id: str, offset: int, data: bytes, rest: IncomingData
    ) -> tuple[UploadSession, int]:
        """Appends ``data`` and then ``rest`` at ``offset``; the session and the new size."""
        session = await self._active_session(repository, upload_id)
        written = await self._write_staged(upload_id, offset, data, rest)
        await self._advance_session(session, written.size)
        return session, written.size

    async def status(self, repository: str, upload_id: str) -> tuple[UploadSession, int]:
        """An active upload's session and the bytes staged for it."""
        session, staged = await self._session_and_staged(repository, upload_id)
        if session.state is not SessionState.ACTIVE:
            raise unknown_upload(upload_id)
        return session, staged

    async def cancel(self, repository: str, upload_id: str) -> None:
        """Cancels an upload: the session first (once cancelled, no write or commit is accepted
        for it), then its staged bytes, best effort: when blobsvc cannot drop them now, the
        collector's purge aborts staging areas with no active session. Cancelling a cancelled
        upload again is no error (a retried cancel), and drops the bytes again."""
        session = await self._session(repository, upload_id)
        if session.state is SessionState.COMMITTED:
            raise unknown_upload(upload_id)
        if session.state is SessionState.ACTIVE:
            await self._links.finish_session(upload_id, SessionState.CANCELLED)
        try:
            await self._blobs.abort(upload_id)
        except LinkedBlobError as err:
            log.warning(
                "upload %s cancelled; its staged bytes are left to the purge: %s", upload_id, err
            )

    async def commit(
        self,
        repository: str,
        upload_id: str,
        digest: Digest,
        media_type: str,
        data: bytes = b"",
        offset: int = 0,
    ) -> LinkedBlob:
        """Commits the staged bytes (with ``data`` appended at ``offset`` first) as ``digest``,
        and links the blob into ``repository``."""
        # The session is read (with the staged size, at once) before the lease is taken: a
        # commit refused for an upload that is unknown, of another repository or finished takes
        # no lease, so failing commits cannot keep arbitrary digests from garbage collection.
        # The lease still comes before anything is committed in blobsvc, on every path (the
        # recovery in _commit_staged included), and a commit refused after it gives it back.
        if data:
            session, staged = await self._session(repository, upload_id), 0
        else:
            session, staged = await self._session_and_staged(repository, upload_id)
        if session.state is SessionState.COMMITTED:
            # A retried commit (its answer was lost): answer from the link it made, as linksvc
            # has it now (never from a cached entry, which may outlive the link).
            try:
                return await self._links.resolve(repository, str(digest), fresh=True)
            except LinkedBlobError as err:
                if err.code == StatusCode.NOT_FOUND:
                    raise unknown_upload(upload_id) from None
                raise
        if session.state is not SessionState.ACTIVE:
            raise unknown_upload(upload_id)
        granted = await self._leases.take(str(digest))
        assert isinstance(granted, Lease)  # a lease without link_repository never links
        async with self._leases.released_on_failure(str(digest), granted):
            if staged > session.size:
                # Bytes written to blobsvc directly: recorded in the session before the commit
                # moves them, so that a commit retried after the staged bytes became a blob
                # (and before the link was made) is finished from the size the session
                # recorded.
                await self._advance_session(session, staged)
                session = dataclasses.replace(session, size=staged)
            stored = await self._commit_staged(session, digest, data, offset)
            return await self._leases.link(
                repository,
                stored.digest,
                media_type,
                stored.size,
                granted,
                finish_session=upload_id,
            )

    # --- steps ----------------------------------------------------------------------------------

    async def _session(self, repository: str, upload_id: str) -> UploadSession:
        """The session, if it belongs to ``repository`` (otherwise it is unknown here)."""
        session = await self._links.get_session(upload_id)
        if session.repository != repository:
            raise unknown_upload(upload_id)
        return session

    async def _active_session(self, repository: str, upload_id: str) -> UploadSession:
        session = await self._session(repository, upload_id)
        if session.state is not SessionState.ACTIVE:
            raise unknown_upload(upload_id)
        return session

    async def _staged_size(self, upload_id: str) -> int:
        """The bytes blobsvc holds for an upload; 0 for one never written."""
        try:
            return await self._blobs.upload_size(upload_id)
        except LinkedBlobError as err:
            if err.reason == Reason.BLOB_UPLOAD_UNKNOWN:
                return 0
            raise

    async def _session_and_staged(
        self, repository: str, upload_id: str
    ) -> tuple[UploadSession, int]:
        """Both at once: the session (ownership, state) and the staged size (the truth). For
        a finished session the size is 0, whatever blobsvc answered (or failed to)."""
        session, staged = await asyncio.gather(
            self._session(repository, upload_id),
            self._staged_size(upload_id),
            return_exceptions=True,
        )
        if isinstance(session, BaseException):
            raise session
        if session.state is not SessionState.ACTIVE:
            return session, 0
        if isinstance(staged, BaseException):
            raise staged
        return session, staged

    async def _advance_session(self, session: UploadSession, size: int) -> None:
        """Moves the session's recorded size up to ``size`` (a compare-and-set in linksvc).

        Losing the race to a concurrent writer retries from the size that writer set.
        """
        current = session.size
        for _ in range(ADVANCE_ATTEMPTS):
            if size <= current:
                return
            try:
                await self._links.advance_session(session.id, current, size)
                return
            except LinkedBlobError as err:
                if err.code != StatusCode.ABORTED or "size" not in err.metadata:
                    raise
                current = int(err.metadata["size"])
        # Still racing: the bytes are staged all the same; the next write catches up.

    async def _write_staged(
        self,
        upload_id: str,
        offset: int,
        data: bytes,
        rest: IncomingData | None,
        commit: CommitSpec | None = None,
        counted_as: str = "",
    ) -> Written:
        """Appends to an active session's staging area at ``offset`` (then commits it, with
        ``commit``).

        blobsvc checks the offset against the staged bytes (OUT_OF_RANGE with "size"). A
        session never written has no staging area in blobsvc, which refuses a write past 0 as
        an unknown upload; for the Registry such an upload is at offset 0 (as GetUpload says),
        so that is the same wrong-offset answer.
        """
        try:
            return await self._blobs.write(upload_id, offset, data, rest, commit, counted_as)
        except LinkedBlobError as err:
            if offset > 0 and err.reason == Reason.BLOB_UPLOAD_UNKNOWN:
                raise out_of_range(
                    Reason.BLOB_UPLOAD_INVALID,
                    f"upload {upload_id} has 0 bytes; cannot write at {offset}",
                    size=0,
                ) from None
            raise

    async def _commit_staged(
        self, session: UploadSession, digest: Digest, data: bytes, offset: int
    ) -> BlobDescriptor:
        """Commits an upload's staged bytes (with an optional last chunk) in blobsvc."""
        if data:
            # The digest's algorithm: a new upload then hashes with it as the bytes arrive
            # (sha256 otherwise, and a sha512 commit would read the staged bytes again).
            spec = CommitSpec(str(digest), algorithm=digest.algorithm)
            written = await self._write_staged(
                session.id, offset, data, None, spec, counted_as="CommitUpload"
            )
            assert written.blob is not None  # a write that commits answers with the blob
            return written.blob
        try:
            return await self._blobs.commit(session.id, str(digest))
        except LinkedBlobError as err:
            if err.reason != Reason.BLOB_UPLOAD_UNKNOWN:
                raise
            missing = err
        if session.size == 0:
            # Never written: an empty upload. Committing an empty staging area verifies the
            # digest (only the empty blob's passes).
            written = await self._blobs.write(
                session.id, 0, b"", None, CommitSpec(str(digest), algorithm=digest.algorithm)
            )
            assert written.blob is not None
            return written.blob
        # The staged bytes are gone while the session is active: an earlier commit moved them
        # into the store and stopped before linking. Finish that job when the store holds the
        # digest at exactly the size this session wrote; otherwise the upload is unknown.
        try:
            stored = await self._blobs.stat(str(digest))
        except LinkedBlobError:
            raise missing from None
        if stored.size != session.size:
            raise missing
        return stored
