"""The gateway's cache of resolved links, and CachedLinks: a LinkBackend that keeps them.

LinkCache maps (repository, digest) to the descriptor seen through that link.

A resolution cannot change while the link exists (the digest fixes the bytes and the size; only
a new Link with a media type changes the media type, and that goes through a gateway, which
refreshes its entry). What can happen elsewhere is a delete: another gateway unlinks, and this
one keeps answering from memory until the entry expires. So every entry lives at most ``ttl``
seconds; a delete through this gateway drops the entry at once; a Link, Mount, Put or Commit
through it (and a Lease that links at once) stores the fresh answer. Misses are not cached (a
blob pushed through another gateway is visible at once). Bounded: the least recently used
entries go first. A blob the store lost (a read found it gone) drops its entry too.

CachedLinks applies these rules around any LinkBackend (as distribution's cached blob statter
wraps its backend), so the domain code calls it as it would call linksvc.

Plain Python, single-threaded use (the gateway's event loop).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from gateway.backends import LinkBackend
from gateway.model import BlobDescriptor, Lease, LinkedBlob, Page, SessionState, UploadSession

Value = TypeVar("Value")
Key = tuple[str, str]


class LinkCache(Generic[Value]):
    def __init__(
        self, ttl: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[Key, tuple[float, Value]] = OrderedDict()
        # Bumped by every invalidation: an answer fetched before it may be stale, so it is not
        # stored (see `generation` and `put`).
        self._generation = 0
        # linkedblob_link_cache_* (imported here: prometheus_client is a server dependency).
        from linkedblob import metrics

        self._hits = metrics.CACHE_LOOKUPS.labels("hit")
        self._misses = metrics.CACHE_LOOKUPS.labels("miss")
        self._evictions = metrics.CACHE_EVICTIONS

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self.max_entries > 0

    @property
    def generation(self) -> int:
        """Read before asking linksvc; hand it to :meth:`put` with the answer."""
        return self._generation

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, repository: str, digest: str) -> Value | None:
        key = (repository, digest)
        entry = self._entries.get(key)
        if entry is None:
            self._misses.inc()
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._entries[key]
            self._misses.inc()
            return None
        self._entries.move_to_end(key)
        self._hits.inc()
        return value

    def put(
        self, repository: str, digest: str, value: Value, generation: int | None = None
    ) -> None:
        """Stores an answer; one fetched before the latest invalidation (``generation`` older
        than :attr:`generation`) is dropped, since a delete may have raced with it."""
        if not self.enabled or (generation is not None and generation != self._generation):
            return
        key = (repository, digest)
        self._entries[key] = (self._clock() + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self._evictions.inc()

    def invalidate(self, repository: str, digest: str) -> None:
        self._generation += 1
        self._entries.pop((repository, digest), None)


class CachedLinks:
    """A LinkBackend answering resolutions (and mounts of blobs already linked) from a
    LinkCache, and keeping it current with what goes through it."""

    def __init__(self, links: LinkBackend, cache: LinkCache[LinkedBlob]) -> None:
        self._links = links
        self.cache = cache

    async def resolve(self, repository: str, digest: str, fresh: bool = False) -> LinkedBlob:
        """From the cache unless ``fresh`` (then linksvc's answer, kept as any other is)."""
        cached = None if fresh else self.cache.get(repository, digest)
        if cached is not None:
            return cached
        generation = self.cache.generation
        linked = await self._links.resolve(repository, digest, fresh)
        return self._keep(repository, linked, generation)

    async def link(
        self,
        repository: str,
        digest: str,
        media_type: str,
        size: int | None = None,
        finish_session: str = "",
        lease_id: str = "",
    ) -> LinkedBlob:
        generation = self.cache.generation
        linked = await self._links.link(
            repository, digest, media_type, size, finish_session, lease_id
        )
        return self._keep(repository, linked, generation)

    async def lease(
        self,
        digest: str,
        ttl: float,
        link_repository: str = "",
        media_type: str = "",
        size: int | None = None,
    ) -> Lease | LinkedBlob:
        """A lease (nothing to remember), or the link it made at once (kept, as a Link's)."""
        generation = self.cache.generation
        granted = await self._links.lease(digest, ttl, link_repository, media_type, size)
        if isinstance(granted, LinkedBlob):
            return self._keep(link_repository, granted, generation)
        return granted

    async def release_lease(self, digest: str, lease_id: str) -> bool:
        return await self._links.release_lease(digest, lease_id)  # nothing to remember

    async def mount(self, repository: str, source: str, digest: str, media_type: str) -> LinkedBlob:
        # Already linked here, from a source that links it (as far as this gateway saw within
        # the TTL), with no new media type: nothing to change, no call to make.
        linked = self.cache.get(repository, digest)
        if (
            linked is not None
            and media_type in ("", linked.media_type)
            and (not source or self.cache.get(source, digest) is not None)
        ):
            return linked
        generation = self.cache.generation
        mounted = await self._links.mount(repository, source, digest, media_type)
        return self._keep(repository, mounted, generation)

    async def unlink(self, repository: str, digest: str) -> None:
        try:
            await self._links.unlink(repository, digest)
        finally:
            # Whatever the unlink's outcome: an answer fetched before it is not kept any more
            # (see LinkCache.put).
            self.cache.invalidate(repository, digest)

    def forget(self, repository: str, digest: str) -> None:
        self.cache.invalidate(repository, digest)
        self._links.forget(repository, digest)

    def _keep(self, repository: str, linked: LinkedBlob, generation: int) -> LinkedBlob:
        self.cache.put(repository, linked.digest, linked, generation)
        return linked

    # --- not cached -----------------------------------------------------------------------------

    async def stat_blob(self, digest: str) -> BlobDescriptor:
        return await self._links.stat_blob(digest)

    async def list_links(
        self, repository: str, page_size: int, page_token: str
    ) -> Page[LinkedBlob]:
        return await self._links.list_links(repository, page_size, page_token)

    async def list_repositories(self, page_size: int, page_token: str) -> Page[str]:
        return await self._links.list_repositories(page_size, page_token)

    async def list_linking_repositories(
        self, digest: str, page_size: int, page_token: str
    ) -> Page[str]:
        return await self._links.list_linking_repositories(digest, page_size, page_token)

    async def create_session(self, repository: str) -> UploadSession:
        return await self._links.create_session(repository)

    async def list_sessions(
        self, repository: str, page_size: int, page_token: str
    ) -> Page[UploadSession]:
        return await self._links.list_sessions(repository, page_size, page_token)

    async def get_session(self, upload_id: str) -> UploadSession:
        return await self._links.get_session(upload_id)

    async def advance_session(self, upload_id: str, from_size: int, to_size: int) -> None:
        await self._links.advance_session(upload_id, from_size, to_size)

    async def finish_session(self, upload_id: str, state: SessionState) -> None:
        await self._links.finish_session(upload_id, state)
