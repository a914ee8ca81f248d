"""The registry's operations on blobs through links: stat, read, store (in one call), mount,
delete and list.

Access goes through links: a blob is stat'ed or read only after the link backend resolved the
repository's link. A blob is stored in the order that keeps docs/design.md's invariants: bytes
durable in blobsvc, then recorded and linked (one linksvc transaction, Link with ``size``), all
under a lease taken before the bytes are committed (gateway.leases).

Callers pass validated values (gateway.validation); failures are LinkedBlobError.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncGenerator, Callable, Sequence

from grpc import StatusCode  # the codes of LinkedBlobError

from gateway.backends import BlobBackend, LinkBackend
from gateway.leases import DELETING_BACKOFF, Leases
from gateway.model import CommitSpec, IncomingData, LinkedBlob, OutgoingData, Page
from gateway.options import DEFAULT_LEASE_TTL
from linkedblob import paging
from linkedblob.digests import DEFAULT_ALGORITHM, Digest
from linkedblob.errors import (
    LinkedBlobError,
    Reason,
    failed_precondition,
    invalid_argument,
    not_found,
    out_of_range,
)

# Which repositories a caller may pull (gateway.auth.access.Caller.may_pull); None: all of them
# (an open gateway, or a caller granted pull on every repository).
MayPull = Callable[[str], bool] | None

# Linking a blob without its bytes (a PushBlob declaring a recorded digest, a MountBlob without
# a source) needs a repository the caller may already pull it from: the repositories that link
# the digest are looked through, at most this many pages of this many (a digest linked more
# widely than that, none of the first of them readable by the caller, needs its bytes sent).
SOURCE_PAGES = 4
SOURCE_PAGE_SIZE = 250
# ListRepositories for a caller who may list only the repositories it may pull: at most this
# many linksvc pages of this size are filtered per call; a page may then hold fewer names than
# asked for (even none) and still have a next_page_token.
CATALOG_PAGES = 8
CATALOG_PAGE_SIZE = 500
# linksvc's page-token kind of ListRepositories (linkedblob.paging: "<kind>\n<scope>\n<after>"):
# a filtered page that ends inside a linksvc page resumes after its last name.
LINKSVC_REPOSITORIES_TOKEN = "repositories"

# Seconds after which a failed PushBlob's staging area is aborted a second time (default).
ABORT_AGAIN_AFTER = 2.0
# Above this many bytes a PutBlob's payload is hashed in a worker thread (hashlib lets go of the
# GIL), not on the event loop.
HASH_IN_THREAD_BYTES = 256 * 1024


def _push_upload_id() -> str:
    """A PushBlob's staging area of its own: nobody else knows the id, nobody can resume it."""
    return f"push-{secrets.token_urlsafe(18)}"


async def _verified_digest(data: bytes, claimed: Digest | None) -> Digest:
    """The digest of a PutBlob's payload (with the claimed digest's algorithm); DIGEST_INVALID
    when it is not the claimed one. Hashed here, not only by blobsvc: a recorded blob is linked
    without sending blobsvc the bytes, so nothing else would check them."""
    algorithm = claimed.algorithm if claimed is not None else DEFAULT_ALGORITHM
    if len(data) > HASH_IN_THREAD_BYTES:
        actual = await asyncio.to_thread(Digest.of, data, algorithm)
    else:
        actual = Digest.of(data, algorithm)
    if claimed is not None and actual != claimed:
        raise invalid_argument(
            Reason.DIGEST_INVALID,
            f"data hashes to {actual}, not {claimed}",
            digest=str(actual),
        )
    return actual


class Registry:
    def __init__(
        self,
        blobs: BlobBackend,
        links: LinkBackend,
        *,
        enable_delete: bool = False,
        abort_again_after: float = ABORT_AGAIN_AFTER,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        deleting_backoff: Sequence[float] = DELETING_BACKOFF,
    ) -> None:
        """``abort_again_after``: seconds after which a failed PushBlob's staging area is
        aborted a second time (see :meth:`_drop_staging`); ``lease_ttl`` and
        ``deleting_backoff``: see gateway.leases.Leases."""
        self._blobs = blobs
        self._links = links
        self._leases = Leases(links, ttl=lease_ttl, deleting_backoff=deleting_backoff)
        self._enable_delete = enable_delete
        self._abort_again_after = abort_again_after
        self._cleanups: set[asyncio.Task[None]] = set()  # aborts in flight (kept referenced)

    async def close(self) -> None:
        """Ends the cleanups still pending (before the backends' channels close): an abort
        not yet made is left to the collector's purge of staging areas with no session."""
        pending = list(self._cleanups)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # --- reading --------------------------------------------------------------------------------

    async def stat(self, repository: str, digest: str) -> LinkedBlob:
        return await self._links.resolve(repository, digest)

    async def read(
        self, repository: str, blob: LinkedBlob, offset: int, length: int, out: OutgoingData
    ) -> AsyncGenerator[bytes, None] | None:
        """The bytes of a resolved blob from ``offset`` (``length`` 0: to the end), as ``out``
        asks; None when there are none to send (only ``out.head`` is)."""
        if offset > blob.size:
            raise out_of_range(
                Reason.RANGE_INVALID,
                f"offset {offset} is beyond the end of the blob ({blob.size} bytes)",
                size=blob.size,
            )
        available = blob.size - offset
        want = available if length == 0 else min(length, available)
        if want == 0:
            return None
        try:
            return await self._blobs.open_read(blob.digest, offset, want, out)
        except LinkedBlobError as err:
            if err.code == StatusCode.NOT_FOUND:  # linked, but gone from the store
                self._links.forget(repository, blob.digest)
            raise

    # --- storing in one call --------------------------------------------------------------------

    async def put(
        self, repository: str, media_type: str, digest: Digest | None, data: bytes
    ) -> LinkedBlob:
        """Stores a small blob and links it: a recorded blob is linked without calling blobsvc
        (the Lease links it at once), a new one is put under a lease and then linked."""
        digest = await _verified_digest(data, digest)
        granted = await self._leases.take(str(digest), repository, media_type, len(data))
        if isinstance(granted, LinkedBlob):
            return granted
        async with self._leases.released_on_failure(str(digest), granted):
            stored = await self._blobs.put(data, str(digest), counted_as="PutBlob")
            return await self._leases.link(
                repository, stored.digest, media_type, stored.size, granted
            )

    async def push(
        self,
        repository: str,
        media_type: str,
        digest: Digest | None,
        size: int | None,
        data: IncomingData,
        may_pull: MayPull = None,
    ) -> LinkedBlob:
        """Stores the blob ``data`` streams and links it; a blob already recorded under
        ``digest`` is linked without reading the data, when the caller may pull it from some
        repository (``may_pull``; see :meth:`readable_source`). Otherwise the data is read and
        verified as for a new blob, and no answer depends on what is recorded."""
        if digest is None:
            return await self._push_undeclared(repository, media_type, size, data)
        if may_pull is None or await self.readable_source(str(digest), may_pull) is not None:
            granted = await self._leases.take(str(digest), repository, media_type, size)
        else:
            granted = await self._leases.take(str(digest))
        if isinstance(granted, LinkedBlob):
            return granted
        upload_id = _push_upload_id()
        commit = CommitSpec(str(digest), size, digest.algorithm)
        async with self._leases.released_on_failure(str(digest), granted):
            try:
                written = await self._blobs.write(upload_id, 0, b"", data, commit)
            except BaseException:
                self._drop_staging(upload_id)
                raise
            assert written.blob is not None  # a write that commits answers with the blob
            blob = written.blob
            return await self._leases.link(repository, blob.digest, media_type, blob.size, granted)

    async def _push_undeclared(
        self, repository: str, media_type: str, size: int | None, data: IncomingData
    ) -> LinkedBlob:
        """A push with no digest: staged without a commit, its digest (blobsvc's, from the
        running hash) leased, then committed and linked; a recorded digest is linked at once
        and its staged copy dropped."""
        upload_id = _push_upload_id()
        try:
            written = await self._blobs.write(upload_id, 0, b"", data, want_staged_digest=True)
            if size is not None and written.size != size:
                raise invalid_argument(
                    Reason.SIZE_INVALID,
                    f"{written.size} bytes were sent, not the declared {size}",
                    size=written.size,
                )
            digest = written.staged_digest
            if not digest:  # a blobsvc older than want_staged_digest
                raise LinkedBlobError(
                    StatusCode.INTERNAL, Reason.INTERNAL, "blobsvc answered no staged digest"
                )
            granted = await self._leases.take(digest, repository, media_type, written.size)
            if isinstance(granted, LinkedBlob):
                self._drop_staging(upload_id, settle=False)
                return granted
        except BaseException:
            self._drop_staging(upload_id)
            raise
        async with self._leases.released_on_failure(digest, granted):
            try:
                stored = await self._blobs.commit(upload_id, digest)
            except BaseException:
                self._drop_staging(upload_id)
                raise
            return await self._leases.link(
                repository, stored.digest, media_type, stored.size, granted
            )

    def _drop_staging(self, upload_id: str, settle: bool = True) -> None:
        """Drops the staging area of a push that failed or is not needed (nobody can resume
        it).

        In tasks of their own, so that a handler being cancelled (its caller went away) cannot
        stop them. A blobsvc Write this gateway cancelled may still be settling (and re-create
        the staging area with the bytes it received) when the first abort arrives, so a second
        one follows once it has settled (``settle``; not needed after a write that ended).
        Best effort: a crash in between leaves the staged bytes to the collector's purge of
        staging areas with no session.
        """
        loop = asyncio.get_running_loop()
        for after in (0.0, self._abort_again_after) if settle else (0.0,):
            task = loop.create_task(self._abort_quietly(upload_id, after))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    async def _abort_quietly(self, upload_id: str, after: float) -> None:
        if after:
            await asyncio.sleep(after)
        # The backends answer every failure as a LinkedBlobError (a closed channel included:
        # UNAVAILABLE), so nothing else can escape into the task.
        with contextlib.suppress(LinkedBlobError):
            await self._blobs.abort(upload_id)

    # --- links ----------------------------------------------------------------------------------

    async def mount(
        self,
        repository: str,
        source: str,
        digest: Digest,
        media_type: str,
        may_pull: MayPull = None,
    ) -> LinkedBlob:
        """Links into ``repository`` a blob ``source`` links; with no source, one of the
        repositories the caller may pull (``may_pull``) links: none is answered as a blob no
        repository links (NOT_FOUND / BLOB_UNKNOWN), whatever else links it."""
        if not source and may_pull is not None:
            found = await self.readable_source(str(digest), may_pull)
            if found is None:
                raise not_found(
                    Reason.BLOB_UNKNOWN, f"blob {digest} is not linked in any repository"
                )
            source = found
        return await self._links.mount(repository, source, str(digest), media_type)

    async def readable_source(self, digest: str, may_pull: Callable[[str], bool]) -> str | None:
        """A repository that links ``digest`` and that ``may_pull`` allows; None when there is
        none among the first SOURCE_PAGES x SOURCE_PAGE_SIZE repositories that link it."""
        token = ""
        for _ in range(SOURCE_PAGES):
            page = await self._links.list_linking_repositories(digest, SOURCE_PAGE_SIZE, token)
            for name in page.items:
                if may_pull(name):
                    return name
            if not page.next_page_token:
                return None
            token = page.next_page_token
        return None

    def check_delete_enabled(self) -> None:
        """FAILED_PRECONDITION / UNSUPPORTED unless deletes are enabled (checked before
        anything else of a delete)."""
        if not self._enable_delete:
            raise failed_precondition(
                Reason.UNSUPPORTED, "deletes are disabled on this gateway (--enable-delete)"
            )

    async def delete(self, repository: str, digest: Digest) -> None:
        self.check_delete_enabled()
        await self._links.unlink(repository, str(digest))

    async def list_blobs(
        self, repository: str, page_size: int, page_token: str
    ) -> Page[LinkedBlob]:
        return await self._links.list_links(repository, page_size, page_token)

    async def list_repositories(
        self, page_size: int, page_token: str, may_pull: MayPull = None
    ) -> Page[str]:
        """Repository names in order, paged; with ``may_pull``, only those it allows: linksvc's
        pages are filtered, at most CATALOG_PAGES of them per call, so a page may hold fewer
        names than ``page_size`` (even none) while a next_page_token says more may follow."""
        if may_pull is None:
            return await self._links.list_repositories(page_size, page_token)
        size = paging.page_size(page_size)
        found: list[str] = []
        token = page_token
        for _ in range(CATALOG_PAGES):
            page = await self._links.list_repositories(CATALOG_PAGE_SIZE, token)
            for i, name in enumerate(page.items):
                if may_pull(name):
                    found.append(name)
                    if len(found) == size:
                        more = i < len(page.items) - 1 or bool(page.next_page_token)
                        return Page(found, _after_repository(name) if more else "")
            if not page.next_page_token:
                return Page(found, "")
            token = page.next_page_token
        return Page(found, token)


def _after_repository(name: str) -> str:
    """linksvc's ListRepositories page token for the names after ``name``."""
    return paging.encode_page_token(LINKSVC_REPOSITORIES_TOKEN, "", name)
