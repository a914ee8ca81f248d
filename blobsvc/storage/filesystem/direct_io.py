"""Direct I/O (O_DIRECT) under one storage root: staged bytes and uncached reads bypass the
page cache.

Why: on this project's VMs a fresh page-cache page costs a host fault (guest memory is handed
back to the host when free), so buffered writes and cold buffered reads cost several times the
kernel CPU of O_DIRECT ones (measured: bench/README.md, section "blobsvc: direct I/O").

Whole blocks (4 KiB) go with O_DIRECT from an aligned buffer (a small pool of them is kept); a
partial last block also goes through the page cache, so after every append the file holds
every accepted byte (its size is the upload's size), and the next append rewrites that block
with O_DIRECT (Linux writes the cached page back and drops it first; see
blobsvc.storage.filesystem.uploads). The fsync at commit stays: O_DIRECT does not flush the
device's cache. Reads (blobs and staged bytes) come from the page cache when all of the range
is there (asked with cachestat(2)), else with O_DIRECT. The price: a push leaves its blob
uncached, so its first pull reads the disk; a blob read again while remembered is read into
the page cache (see .read_admission), so popular blobs are served from memory. Where the
filesystem refuses O_DIRECT (EINVAL: ramfs, some FUSE), or with ``--direct-io off``,
everything goes through the page cache.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable

from linkedblob.config import STREAM_CHUNK_BYTES
from linkedblob.libc import libc

log = logging.getLogger(__name__)

# O_DIRECT transfers start and end on blocks of this many bytes, in memory aligned as much
# (more where the filesystem's block size says so).
DIRECT_ALIGNMENT = 4096
# Aligned buffers kept for reuse (the default): a fresh one page-faults in a MiB on first use.
IDLE_DIRECT_BUFFERS = 8

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_SYS_CACHESTAT = 451  # the same number on every architecture (Linux 6.5+)


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


def _cache_counter() -> Callable[[int, int, int], int] | None:
    """Linux's cachestat(2): how many pages of a file's range are in the page cache.

    Asking costs nothing else. preadv(RWF_NOWAIT), the other way to ask, starts readahead into
    the page cache when it misses, which is the cost we are avoiding (measured: bench/README.md,
    section "blobsvc: direct I/O"). None where libc has no syscall(); a kernel without
    cachestat fails at the first call."""
    syscall = getattr(libc(), "syscall", None)
    if syscall is None:
        return None
    syscall.restype = ctypes.c_long
    syscall.argtypes = [
        ctypes.c_long,
        ctypes.c_long,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_long,
    ]

    def cached_pages(fd: int, offset: int, length: int) -> int:
        span = _CacheStatRange(offset, length)
        stat = _CacheStat()
        if syscall(_SYS_CACHESTAT, fd, ctypes.addressof(span), ctypes.addressof(stat), 0) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return int(stat.nr_cache)

    return cached_pages


# None where it cannot be asked (then direct reads are off).
cached_pages = _cache_counter()


def _round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _direct_alignment(root: str) -> int | None:
    """The alignment of O_DIRECT transfers under ``root``; None when it is not a whole number
    of memory pages or more than a stream chunk (then direct I/O is not used)."""
    alignment = max(DIRECT_ALIGNMENT, os.statvfs(root).f_bsize, os.stat(root).st_blksize)
    if alignment % mmap.PAGESIZE or alignment > STREAM_CHUNK_BYTES:
        return None
    return alignment


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


class DirectIO:
    """O_DIRECT under one storage root: its alignment, whether the filesystem takes it, and a
    small pool of page-aligned buffers (anonymous mmaps) to transfer through.

    Turned off for the root, and logged once, the first time the filesystem refuses it
    (EINVAL at an open or a transfer: ramfs, some FUSE filesystems); reads alone are turned
    off where the kernel cannot tell what is cached (no cachestat(2): Linux before 6.5)."""

    def __init__(self, root: str, enabled: bool, idle_buffers: int = IDLE_DIRECT_BUFFERS) -> None:
        """``enabled``: False sends everything through the page cache. ``idle_buffers``: how
        many aligned buffers the pool keeps for reuse."""
        self.root = root
        alignment = _direct_alignment(root) if enabled and _O_DIRECT else None
        self.alignment = alignment or DIRECT_ALIGNMENT
        self.writes = alignment is not None
        self.reads = self.writes and cached_pages is not None
        # A stream chunk at any offset, with the partial blocks before and after it.
        self.buffer_bytes = STREAM_CHUNK_BYTES + 2 * self.alignment
        self._idle: list[mmap.mmap] = []
        self._idle_buffers = idle_buffers
        self._lock = threading.Lock()

    def reopen(self, fd: int, flags: int) -> int:
        """A second open file description of ``fd``'s file (the same inode, even unlinked),
        with O_DIRECT; -1 when the filesystem refuses it (direct I/O is then off)."""
        try:
            return os.open(f"/proc/self/fd/{fd}", flags | _O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT):
                raise  # e.g. out of file descriptors: not the filesystem's answer
            self.refused("an O_DIRECT open", exc)
            return -1

    def refused(self, what: str, exc: OSError, reads_only: bool = False) -> None:
        """Turns direct I/O (or only direct reads) off for this root, and says so once."""
        with self._lock:
            if not self.reads and (reads_only or not self.writes):
                return
            self.reads = False
            if not reads_only:
                self.writes = False
        log.info(
            "direct I/O off for %s: %s failed (%s); using the page cache",
            "reads" if reads_only else "reads and writes",
            what,
            exc,
            extra={"root": self.root},
        )

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return mmap.mmap(-1, self.buffer_bytes)

    def give(self, buffer: mmap.mmap) -> None:
        # Beyond the pool's bound the buffer is dropped: unmapped once no view of it is left.
        with self._lock:
            if len(self._idle) < self._idle_buffers:
                self._idle.append(buffer)

    def close(self) -> None:
        with self._lock:
            self._idle.clear()

    def read(self, fd: int, direct_fd: int, offset: int, length: int, size: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` of a file of ``size`` bytes open as ``fd``
        and (with O_DIRECT) ``direct_fd``: through the page cache when all of the range is
        there, else with O_DIRECT."""
        end = min(offset + length, size)
        if not self.reads or direct_fd < 0 or end <= offset:
            return os.pread(fd, length, offset)
        assert cached_pages is not None  # self.reads says so
        pages = (end - 1) // mmap.PAGESIZE - offset // mmap.PAGESIZE + 1
        try:
            if cached_pages(fd, offset, end - offset) >= pages:
                return os.pread(fd, length, offset)  # straight into the bytes returned
        except OSError as exc:
            self.refused("cachestat", exc, reads_only=True)
            return os.pread(fd, length, offset)
        # Uncached (at least in part): the whole range with O_DIRECT, which first writes back
        # any dirty cached page in it, so it sees every byte written.
        try:
            step = self.buffer_bytes - 2 * self.alignment
            if end - offset <= step:
                return self._read_direct(direct_fd, offset, end - offset)
            pieces = []  # longer than a buffer (not a stream's reads): piece by piece
            for start in range(offset, end, step):
                piece = self._read_direct(direct_fd, start, min(step, end - start))
                pieces.append(piece)
                if len(piece) < min(step, end - start):
                    break
            return b"".join(pieces)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.refused("an O_DIRECT read", exc, reads_only=True)
            return os.pread(fd, length, offset)

    def _read_direct(self, direct_fd: int, offset: int, length: int) -> bytes:
        """The blocks around [offset, offset + length) into an aligned buffer; the range
        sliced out of them (shorter at the end of the file)."""
        base = offset - offset % self.alignment
        span = _round_up(offset + length, self.alignment) - base
        buffer = self.take()
        try:
            view = memoryview(buffer)
            got = os.preadv(direct_fd, [view[:span]], base)
            return bytes(view[offset - base : min(got, offset - base + length)])
        finally:
            self.give(buffer)
