"""Admission to the page cache on the second read: which blobs were read recently."""

from __future__ import annotations

import collections
import threading

from linkedblob.digests import Digest

# Blobs remembered, by default (digests, oldest forgotten first).
RECENT_READS = 4096


class ReadAdmission:
    """Remembers the last ``recent_reads`` blobs opened for reading.

    With direct I/O, what is not cached is read past the page cache: filling it costs more
    kernel time than the read itself on VMs that hand free memory back to their host, and a
    blob read once (most pulls) would only push others out. A blob read a second time while
    remembered is read into the cache, so the reads after that are served from memory: a
    popular blob costs one device read, not one per pull."""

    def __init__(self, recent_reads: int = RECENT_READS) -> None:
        self._recent_reads = recent_reads
        self._recent: collections.OrderedDict[Digest, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def read_before(self, digest: Digest) -> bool:
        """Whether the blob was opened for reading recently (and remembers that it is now)."""
        with self._lock:
            if digest in self._recent:
                self._recent.move_to_end(digest)
                return True
            self._recent[digest] = None
            if len(self._recent) > self._recent_reads:
                self._recent.popitem(last=False)
            return False
