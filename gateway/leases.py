"""The commit order with a lease: what every path that commits bytes in blobsvc goes through.

A blob's bytes are protected from garbage collection from before they are committed in blobsvc
until they are linked: Lease first (linksvc), then the commit (blobsvc), then Link with the
lease (linksvc), which records the blob and consumes the lease. A Lease with a repository links
a recorded blob at once instead (its bytes are durable: nothing to send).

A blob being deleted (ABORTED / BLOB_DELETING: garbage collection fenced it and is deleting its
bytes) is waited for here: the step is retried after each of ``deleting_backoff``'s delays
(about 1.5 s in all by default, the time a deletion takes to finish), then the error goes to the
caller, which retries (the client library does by itself). A Link whose lease expired (ABORTED /
BLOB_UPLOAD_INVALID: the bytes may be gone) is answered as it is: the caller uploads again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from grpc import StatusCode  # the codes of LinkedBlobError

from gateway.backends import LinkBackend
from gateway.model import Lease, LinkedBlob
from gateway.options import DEFAULT_LEASE_TTL
from linkedblob.errors import LinkedBlobError, Reason

T = TypeVar("T")

# Seconds between the attempts of a step that found its blob being deleted (default).
DELETING_BACKOFF = (0.1, 0.2, 0.4, 0.8)


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

    async def take(
        self,
        digest: str,
        link_repository: str = "",
        media_type: str = "",
        size: int | None = None,
    ) -> Lease | LinkedBlob:
        """A lease of ``digest``; with ``link_repository``, the link made at once when the blob
        is recorded (see LinkBackend.lease)."""
        return await self._retrying(
            lambda: self._links.lease(digest, self.ttl, link_repository, media_type, size)
        )

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

    async def _retrying(self, step: Callable[[], Awaitable[T]]) -> T:
        for delay in self.deleting_backoff:
            try:
                return await step()
            except LinkedBlobError as err:
                if not is_deleting(err):
                    raise
            await asyncio.sleep(delay)
        return await step()
