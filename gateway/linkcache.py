"""The gateway's cache of resolved links: (repository, digest) -> the descriptor seen through it.

A resolution cannot change while the link exists (the digest fixes the bytes and the size; only
a new Link with a media type changes the media type, and that goes through a gateway, which
refreshes its entry). What can happen elsewhere is a delete: another gateway unlinks, and this
one keeps answering from memory until the entry expires. So every entry lives at most ``ttl``
seconds; a delete through this gateway drops the entry at once; a Link, Mount, Put or Commit
through it stores the fresh answer. Misses are not cached (a blob pushed through another gateway
is visible at once). Bounded: the least recently used entries go first.

Keys are the request's strings as validated: a lookup with the raw strings of a request can only
hit when they are exactly what was validated before, so a hit needs no validation.

Plain Python, single-threaded use (the gateway's event loop).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

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
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
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

    def invalidate(self, repository: str, digest: str) -> None:
        self._generation += 1
        self._entries.pop((repository, digest), None)
