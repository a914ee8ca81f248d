"""The commit order with a lease: what every path that commits bytes in blobsvc goes through.

A blob's bytes are protected from garbage collection from before they are committed in blobsvc
until they are linked: Lease first (linksvc), then the commit (blobsvc), then Link with the
lease (linksvc), which records the blob and consumes the lease. A Lease with a repository links
a recorded blob at once instead (its bytes are durable: nothing to send).

A call that fails after it took its lease and before its link gives the lease back
(:meth:`Leases.released_on_failure`, linksvc's ReleaseLease), so that a refused call leaves no
lease behind, and failing calls cannot keep digests from garbage collection. Best effort: a
release that fails is logged, the call's own error is what its caller gets, and the lease
expires at the end of its TTL as it would have without the release.

A blob being deleted (ABORTED / BLOB_DELETING: garbage collection fenced it and is deleting its
bytes) is waited for here: the step is retried after each of ``deleting_backoff``'s delays
(about 1.5 s in all by default, the time a deletion takes to finish), then the error goes to the
caller, which retries (the client library does by itself). A Link whose lease expired (ABORTED /
BLOB_UPLOAD_INVALID: the bytes may be gone) is answered as it is: the caller uploads again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from grpc import StatusCode  # the codes of LinkedBlobError

from gateway.backends import LinkBackend
from gateway.model import Lease, LinkedBlob
from gateway.options import DEFAULT_LEASE_TTL
from linkedblob.errors import LinkedBlobError, Reason

T = TypeVar("T")

# Seconds between the attempts of a step that found its blob being deleted (default).
DELETING_BACKOFF = (0.1, 0.2, 0.4, 0.8)
# Seconds a release of a lease may take before it is given up (the lease then expires).
RELEASE_TIMEOUT = 5.0

log = logging.getLogger(__name__)


def is_deleting(err: LinkedBlobError) -> bool:
    return err.code == StatusCode.ABORTED and err.reason == Reason.BLOB_DELETING


class Leases:
    """Lease and Link over a LinkBackend, each retried while its blob is being deleted."""

    def __init__(
        self,
        links: LinkBackend,
        *,
        ttl: float = DEFAULT_LEASE_TTL,
        deleting_backoff: Sequence[float] = DELETING_BACKOFF,
    ) -> None:
        """``ttl``: seconds a lease lives; ``deleting_backoff``: the delays before each retry
        of a step refused with BLOB_DELETING."""
        self._links = links
        self.ttl = ttl
        self.deleting_backoff = tuple(deleting_backoff)
        self._releases: set[asyncio.Task[None]] = set()  # releases in flight (kept referenced)
        # Leases in flight whose caller was cancelled (kept referenced until they are released).
        self._abandoned: set[asyncio.Task[Lease | LinkedBlob]] = set()

    async def take(
        self,
        digest: str,
        link_repository: str = "",
        media_type: str = "",
        size: int | None = None,
    ) -> Lease | LinkedBlob:
        """A lease of ``digest``; with ``link_repository``, the link made at once when the blob
        is recorded (see LinkBackend.lease).

        In a task of its own: when the caller is cancelled (its client went away) while linksvc
        grants the lease, the lease is released once granted, not left to expire."""
        task = asyncio.get_running_loop().create_task(
            self._retrying(
                lambda: self._links.lease(digest, self.ttl, link_repository, media_type, size)
            )
        )
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._abandoned.add(task)
            task.add_done_callback(self._abandoned.discard)
            task.add_done_callback(lambda done: self._release_abandoned(digest, done))
            raise

    def _release_abandoned(self, digest: str, done: asyncio.Task[Lease | LinkedBlob]) -> None:
        """Releases the lease a cancelled caller was granted (nothing when none was)."""
        if done.cancelled() or done.exception() is not None:
            return
        granted = done.result()
        if isinstance(granted, Lease):
            self._spawn_release(digest, granted)

    async def link(
        self,
        repository: str,
        digest: str,
        media_type: str,
        size: int,
        lease: Lease,
        finish_session: str = "",
    ) -> LinkedBlob:
        """Records (with ``size``) and links a blob committed under ``lease``."""
        return await self._retrying(
            lambda: self._links.link(
                repository, digest, media_type, size, finish_session, lease_id=lease.id
            )
        )

    @contextlib.asynccontextmanager
    async def released_on_failure(self, digest: str, lease: Lease) -> AsyncIterator[None]:
        """Runs the steps that use ``lease`` (the commit in blobsvc, the link): when one of
        them fails, the lease is released before the failure goes on, unchanged. (After a
        link that failed the lease may be consumed all the same, its answer lost: releasing
        it is then a no-op.)"""
        try:
            yield
        except BaseException:
            await self.release(digest, lease)
            raise

    async def release(self, digest: str, lease: Lease) -> None:
        """Gives back a lease that will not be used, best effort: a failure is logged, never
        raised (the lease then expires after its TTL). In a task of its own, which a handler
        being cancelled (its caller went away) cannot stop; the handler waits for it, so a
        refusal is answered once the lease is gone, unless it is cancelled again meanwhile."""
        await asyncio.shield(self._spawn_release(digest, lease))

    def _spawn_release(self, digest: str, lease: Lease) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._release(digest, lease))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return task

    async def _release(self, digest: str, lease: Lease) -> None:
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT):
                await self._links.release_lease(digest, lease.id)
        except (LinkedBlobError, TimeoutError) as err:
            log.warning("a lease of %s was not released (it expires unused): %s", digest, err)
        except Exception:  # never in place of the call's own error
            log.exception("a lease of %s was not released (it expires unused)", digest)

    async def _retrying(self, step: Callable[[], Awaitable[T]]) -> T:
        for delay in self.deleting_backoff:
            try:
                return await step()
            except LinkedBlobError as err:
                if not is_deleting(err):
                    raise
            await asyncio.sleep(delay)
        return await step()
