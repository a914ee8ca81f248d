"""The filesystem driver: blobs and staged uploads under one root directory.

    ROOT/blobs/<algorithm>/<first 2 hex>/<hex>   committed blobs (never rewritten), sharded
    ROOT/uploads/<upload id>/data                an upload's staged bytes (append-only)
    ROOT/uploads/<upload id>/info                "<algorithm> <generation>" of the upload
    ROOT/tmp/                                    Put's temporary files (where O_TMPFILE fails)

A blob appears under its name only complete and fsynced: the staged file (for Put, an
anonymous O_TMPFILE file made ahead: see AnonymousFiles) is fsynced, hard-linked to its final
name (atomic, and never replaces an existing blob, so concurrent commits of the same digest
leave exactly one copy and each learns whether it was first), and the directory is fsynced.
Upload ids are validated against a strict grammar before they name a path, and digests are
parsed, so no request can reach outside the root.

An upload is held exclusively by one open file description: an in-process claim plus an
``flock`` on its data file, so two blobsvc replicas sharing the root cannot interleave writes.

Staged bytes bypass the page cache (O_DIRECT; see DirectIO). On this project's VMs a fresh
page-cache page costs ~15 us of kernel time (guest memory is handed back to the host when
free): a buffered write of 256 MiB took ~1.0 s of kernel CPU (~230 MB/s), the same writes with
O_DIRECT 0.03 s (~1.6 GB/s). Whole blocks (4 KiB) go with O_DIRECT from an aligned buffer; a
partial last block also goes through the page cache, so after every append the file holds
every accepted byte (its size is the upload's size), and the next append rewrites that block
with O_DIRECT (Linux writes the cached page back and drops it first). The fsync at commit
stays: O_DIRECT does not flush the device's cache. Reads (blobs and staged bytes) come from the
page cache when all of the range is there (asked with cachestat(2)), else with O_DIRECT: the
first pull of a pushed blob cost blobsvc ~0.4 s of CPU per 256 MiB instead of 0.6-1.2 s. The
price: a push leaves its blob uncached, so its first pull reads the disk; a blob read again
while remembered is read into the page cache (see FilesystemStorage._read_before), so popular
blobs are served from memory. Where the filesystem refuses O_DIRECT
(EINVAL: ramfs, some FUSE), or with ``--direct-io off``, everything goes through the page
cache as before.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable

from blobsvc.storage import Storage, UploadClaims, busy, validate_upload_id
from linkedblob.config import STREAM_CHUNK_BYTES
from linkedblob.digests import ALGORITHMS, Digest
from linkedblob.libc import libc

log = logging.getLogger(__name__)

_HEX = frozenset("0123456789abcdef")

# Staged bytes are pushed towards the disk every this many bytes (see _writeback_starter).
WRITEBACK_BYTES = 8 * 1024 * 1024


def _writeback_starter() -> Callable[[int, int, int], None]:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): starts writing a range of a file to
    disk without waiting for it. Done as an upload streams in, the fsync at commit finds
    little left to write (it otherwise writes the whole blob then: ~0.1 s per 100 MiB here).
    A no-op where libc lacks it; errors are ignored (the fsync still decides durability)."""
    sync_file_range = getattr(libc(), "sync_file_range", None)
    if sync_file_range is None:
        return lambda fd, offset, length: None
    sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    sync_file_range.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int, offset: int, length: int) -> None:
        sync_file_range(fd, offset, length, write)

    return start


_start_writeback = _writeback_starter()


# --- direct I/O (see the module docstring) ---

# O_DIRECT transfers start and end on blocks of this many bytes, in memory aligned as much
# (more where the filesystem's block size says so).
DIRECT_ALIGNMENT = 4096
# Aligned buffers kept for reuse: a fresh one page-faults in a MiB on its first use.
IDLE_DIRECT_BUFFERS = 8
# Blobs read recently (digests remembered, oldest forgotten first): a blob read again while
# remembered is read through the page cache, so it stays cached for the reads after it.
RECENT_READS = 4096

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
    the page cache when it misses (measured on 6.18: a miss cached the next 2 MiB, and reading a
    64 MiB file that way ended with all of it cached), which is the cost we are avoiding.
    None where libc has no syscall(); a kernel without cachestat fails at the first call."""
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


_cached_pages = _cache_counter()


def _round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _direct_alignment(root: str) -> int | None:
    """The alignment of O_DIRECT transfers under ``root``; None when it is not a whole number
    of memory pages or more than a stream chunk (then direct I/O is not used)."""
    alignment = max(DIRECT_ALIGNMENT, os.statvfs(root).f_bsize, os.stat(root).st_blksize)
    if alignment % mmap.PAGESIZE or alignment > STREAM_CHUNK_BYTES:
        return None
    return alignment


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
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

    def __init__(self, root: str, enabled: bool) -> None:
        self.root = root
        alignment = _direct_alignment(root) if enabled and _O_DIRECT else None
        self.alignment = alignment or DIRECT_ALIGNMENT
        self.writes = alignment is not None
        self.reads = self.writes and _cached_pages is not None
        # A stream chunk at any offset, with the partial blocks before and after it.
        self.buffer_bytes = STREAM_CHUNK_BYTES + 2 * self.alignment
        self._idle: list[mmap.mmap] = []
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
            if len(self._idle) < IDLE_DIRECT_BUFFERS:
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
        assert _cached_pages is not None  # self.reads says so
        pages = (end - 1) // mmap.PAGESIZE - offset // mmap.PAGESIZE + 1
        try:
            if _cached_pages(fd, offset, end - offset) >= pages:
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


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_ANONYMOUS_FLAGS = getattr(os, "O_TMPFILE", 0) | os.O_WRONLY | os.O_CLOEXEC


def _fsync_dir(path: str) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _open_shard(target: str) -> int:
    """An fd of the directory ``target`` goes in, created durably when it is the first blob of
    its shard (or of its algorithm)."""
    shard = os.path.dirname(target)
    try:
        return os.open(shard, _DIR_FLAGS)
    except FileNotFoundError:
        os.makedirs(shard, exist_ok=True)
        _fsync_dir(os.path.dirname(shard))
        _fsync_dir(os.path.dirname(os.path.dirname(shard)))
        return os.open(shard, _DIR_FLAGS)


def _link_into_place(source: str, shard_fd: int, name: str) -> bool:
    """Hard-links ``source`` (complete, fsynced) as ``name`` in the shard, never replacing a
    blob there, and makes the name durable; True when the blob was already there. The shard is
    fsynced in that case too: the name may be a concurrent commit's, not durable yet, and our
    caller is about to report the blob stored."""
    try:
        os.link(source, name, dst_dir_fd=shard_fd, follow_symlinks=True)
        existed = False
    except FileExistsError:
        existed = True
    os.fsync(shard_fd)
    return existed


def _exists_in(shard_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=shard_fd)
    except FileNotFoundError:
        return False
    return True


class AnonymousFiles:
    """Empty anonymous files (O_TMPFILE) made ahead of need, for Put.

    Creating an inode is the dearest step of storing a small blob (~0.6 ms of kernel time per
    file on this project's ext4 machines, against ~0.15 ms for writing and fsyncing 4 KiB), so
    a thread keeps a few ready, off the request's path. Anonymous files have no name until one
    is linked in: nothing to sweep after a crash, nothing a replica sharing the root can see.
    """

    def __init__(self, directory: str, keep: int = 16) -> None:
        self._dir_fd = os.open(directory, _DIR_FLAGS)
        self._keep = keep
        self._ready: collections.deque[int] = collections.deque()
        self._wanted = threading.Event()
        self._closed = False
        self._wanted.set()
        self._thread = threading.Thread(target=self._refill, name="blob-files", daemon=True)
        self._thread.start()

    def make(self) -> int:
        return os.open(".", _ANONYMOUS_FLAGS, 0o644, dir_fd=self._dir_fd)

    def take(self) -> int:
        """An empty anonymous file open for writing (the caller closes it)."""
        try:
            fd = self._ready.popleft()
        except IndexError:
            fd = self.make()
        if len(self._ready) < self._keep // 2:
            self._wanted.set()
        return fd

    def _refill(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            while len(self._ready) < self._keep:
                if self._closed:
                    return
                try:
                    self._ready.append(self.make())
                except OSError:
                    log.warning("cannot make anonymous files ahead", exc_info=True)
                    break  # Put makes its own until the next wake-up
            if self._closed:
                return

    def close(self) -> None:
        self._closed = True
        self._wanted.set()
        self._thread.join()
        while self._ready:
            os.close(self._ready.popleft())
        os.close(self._dir_fd)


class FileBlobReader:
    """``cache``: read through the page cache even what it does not hold yet (a blob read
    again), instead of reading uncached ranges with O_DIRECT."""

    def __init__(self, fd: int, direct: DirectIO, cache: bool = False) -> None:
        self._fd = fd
        self._size = os.fstat(fd).st_size
        self._direct = direct
        use_direct = direct.reads and not cache
        self._direct_fd = direct.reopen(fd, os.O_RDONLY) if use_direct else -1

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        return self._direct.read(self._fd, self._direct_fd, offset, length, self._size)

    def close(self) -> None:
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FileStagedUpload:
    """An upload's data file, open and flocked; ``size`` is tracked while we hold it.

    With direct I/O a second open file description of the data file (O_DIRECT) writes the
    whole blocks, and the partial block the last append left (``_tail``: its bytes, after the
    last whole block) is kept in memory, to be rewritten whole by the next append."""

    def __init__(
        self, storage: FilesystemStorage, upload_id: str, fd: int, algorithm: str, generation: str
    ) -> None:
        self._storage = storage
        self._upload_id = upload_id
        self._fd = fd
        self._algorithm = algorithm
        self._generation = generation
        self._size = os.fstat(fd).st_size
        self._written_back = self._size  # start of the range not yet pushed to disk
        self._direct = storage.direct
        self._direct_fd = -1
        self._tail = b""
        if self._direct.writes:
            self._direct_fd = self._direct.reopen(fd, os.O_RDWR)
            try:
                self._tail = self._read_tail()
            except BaseException:
                self._close_direct()
                raise

    @property
    def upload_id(self) -> str:
        return self._upload_id

    @property
    def algorithm(self) -> str:
        return self._algorithm

    @property
    def size(self) -> int:
        return self._size

    @property
    def generation(self) -> str:
        return self._generation

    def append(self, data: bytes | memoryview) -> None:
        if self._direct_fd >= 0:
            start = self._size
            try:
                self._append_direct(memoryview(data).cast("B"))
                return
            except OSError as exc:
                self._reread()
                if exc.errno != errno.EINVAL:
                    raise
                # The filesystem took the O_DIRECT open but not the transfer: the rest of
                # this upload (and every later one here) goes through the page cache.
                self._direct.refused("an O_DIRECT write", exc)
                self._close_direct()
                self._written_back = self._size
                data = memoryview(data).cast("B")[self._size - start :]
            except BaseException:
                self._reread()
                raise
        self._append_buffered(data)

    def _append_buffered(self, data: bytes | memoryview) -> None:
        try:
            _write_all(self._fd, data)
        except BaseException:
            self._size = os.fstat(self._fd).st_size  # after a partial write the file is the truth
            raise
        self._size += len(data)
        if self._size - self._written_back >= WRITEBACK_BYTES:
            _start_writeback(self._fd, self._written_back, self._size - self._written_back)
            self._written_back = self._size

    def _append_direct(self, data: memoryview) -> None:
        """Copies the carried tail and ``data`` into an aligned buffer (a buffer at a time),
        writes the whole blocks with O_DIRECT at their offset, and the new bytes of a partial
        last block through the page cache, so the file always ends with every accepted byte.
        (Unchanged bytes of the tail block are rewritten with it; they are the same.)"""
        alignment = self._direct.alignment
        buffer = self._direct.take()
        try:
            view = memoryview(buffer)
            position = 0
            while position < len(data):
                carried = len(self._tail)
                base = self._size - carried  # a block boundary
                count = min(len(data) - position, len(view) - carried)
                filled = carried + count
                view[:carried] = self._tail
                view[carried:filled] = data[position : position + count]
                whole = filled - filled % alignment
                if whole:
                    _pwrite_all(self._direct_fd, view[:whole], base)
                if whole < filled:  # appended at the end of the file (O_APPEND)
                    _write_all(self._fd, view[max(whole, carried) : filled])
                self._size = base + filled
                self._tail = bytes(view[whole:filled])
                position += count
        finally:
            self._direct.give(buffer)

    def _read_tail(self) -> bytes:
        """The bytes after the file's last whole block (we hold the lock: nobody else writes)."""
        carried = self._size % self._direct.alignment
        if not carried:
            return b""
        tail = os.pread(self._fd, carried, self._size - carried)
        if len(tail) != carried:
            raise OSError(errno.EIO, f"upload {self._upload_id} changed under its lock")
        return tail

    def _reread(self) -> None:
        """After a failed append the file is the truth: its size, and its partial last block."""
        self._size = os.fstat(self._fd).st_size
        self._tail = b""
        if self._direct_fd >= 0:
            self._tail = self._read_tail()

    def read_at(self, offset: int, length: int) -> bytes:
        return self._direct.read(self._fd, self._direct_fd, offset, length, self._size)

    def store_as(self, digest: Digest) -> bool:
        target = self._storage.blob_path(digest)
        shard_fd = _open_shard(target)
        try:
            name = os.path.basename(target)
            if _exists_in(shard_fd, name):
                os.fsync(shard_fd)  # see _link_into_place
                existed = True
            else:
                os.fsync(self._fd)
                source = self._storage.upload_data_path(self._upload_id)
                existed = _link_into_place(source, shard_fd, name)
        finally:
            os.close(shard_fd)
        self.discard()
        return existed

    def discard(self) -> None:
        # The info file goes first: a replica re-creating this id after we unlink the data
        # file then writes its own info file (new generation) instead of reading ours.
        directory = self._storage.upload_dir(self._upload_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, "info"))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, "data"))
        with contextlib.suppress(OSError):  # another replica may have just re-created the id
            os.rmdir(directory)

    def _close_direct(self) -> None:
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
            self._tail = b""

    def close(self) -> None:
        self._close_direct()
        if self._fd >= 0:
            os.close(self._fd)  # also releases the flock
            self._fd = -1
            self._storage.claims.release(self._upload_id)


class FilesystemStorage(Storage):
    def __init__(self, root: str, anonymous_files: bool = True, direct_io: bool = True) -> None:
        """``anonymous_files``: False keeps Put to named temporary files (as where the
        filesystem has no O_TMPFILE). ``direct_io``: False sends staged bytes and reads
        through the page cache (see DirectIO)."""
        self.root = os.path.abspath(root)
        self.claims = UploadClaims()
        for sub in ("blobs", "uploads", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self.direct = DirectIO(self.root, direct_io)
        # Admission to the page cache on the second read (see open_blob).
        self._recent_reads: collections.OrderedDict[Digest, None] = collections.OrderedDict()
        self._recent_lock = threading.Lock()
        self._sweep_tmp()
        self._anonymous: AnonymousFiles | None = None
        if anonymous_files and self._anonymous_files_work():
            self._anonymous = AnonymousFiles(os.path.join(self.root, "tmp"))

    def close(self) -> None:
        if self._anonymous is not None:
            self._anonymous.close()
        self.direct.close()

    def _sweep_tmp(self, older_than: float = 3600) -> None:
        """Removes temporary files a crash left behind (an hour old: not a replica's Put)."""
        tmp = os.path.join(self.root, "tmp")
        cutoff = time.time() - older_than
        for entry in os.scandir(tmp):
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)

    # --- paths (only from parsed digests and validated ids) ---

    def blob_path(self, digest: Digest) -> str:
        return os.path.join(self.root, "blobs", digest.algorithm, digest.hex[:2], digest.hex)

    def upload_dir(self, upload_id: str) -> str:
        return os.path.join(self.root, "uploads", validate_upload_id(upload_id))

    def upload_data_path(self, upload_id: str) -> str:
        return os.path.join(self.upload_dir(upload_id), "data")

    # --- committed blobs ---

    def stat(self, digest: Digest) -> int | None:
        try:
            return os.stat(self.blob_path(digest)).st_size
        except FileNotFoundError:
            return None

    def open_blob(self, digest: Digest) -> FileBlobReader | None:
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return FileBlobReader(fd, self.direct, cache=self._read_before(digest))
        except BaseException:
            os.close(fd)
            raise

    def _read_before(self, digest: Digest) -> bool:
        """Whether the blob was opened for reading recently (and remembers that it is now).

        With direct I/O, what is not cached is read past the page cache: filling it costs
        more kernel time than the read itself on VMs that hand free memory back to their host,
        and a blob read once (most pulls) would only push others out. A blob read a second
        time while remembered is read into the cache, so the reads after that are served
        from memory: a popular blob costs one device read, not one per pull."""
        with self._recent_lock:
            if digest in self._recent_reads:
                self._recent_reads.move_to_end(digest)
                return True
            self._recent_reads[digest] = None
            if len(self._recent_reads) > RECENT_READS:
                self._recent_reads.popitem(last=False)
            return False

    def put(self, digest: Digest, data: bytes) -> bool:
        """Small blobs, so the fewest system calls: the bytes go to an anonymous file made
        ahead (AnonymousFiles), fsynced, then linked under the blob's name, and the shard
        fsynced. Where O_TMPFILE does not work, a named temporary file under ROOT/tmp does
        the same."""
        target = self.blob_path(digest)
        name = os.path.basename(target)
        shard_fd = _open_shard(target)
        try:
            if _exists_in(shard_fd, name):
                os.fsync(shard_fd)  # see _link_into_place
                return True
            if self._anonymous is None:
                return self._put_named(data, shard_fd, name)
            fd = self._anonymous.take()
            try:
                _write_all(fd, data)
                os.fsync(fd)
                return _link_into_place(f"/proc/self/fd/{fd}", shard_fd, name)
            finally:
                os.close(fd)
        finally:
            os.close(shard_fd)

    def _put_named(self, data: bytes, shard_fd: int, name: str) -> bool:
        tmp = os.path.join(self.root, "tmp", f"put-{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return _link_into_place(tmp, shard_fd, name)
        finally:
            os.unlink(tmp)

    def _anonymous_files_work(self) -> bool:
        """Whether this filesystem takes O_TMPFILE, and /proc lets us link such a file in."""
        tmp_fd = os.open(os.path.join(self.root, "tmp"), _DIR_FLAGS)
        try:
            fd = os.open(".", _ANONYMOUS_FLAGS, 0o644, dir_fd=tmp_fd)
        except OSError:
            os.close(tmp_fd)
            return False
        probe = f"probe-{secrets.token_hex(8)}"
        try:
            _link_into_place(f"/proc/self/fd/{fd}", tmp_fd, probe)
            os.unlink(probe, dir_fd=tmp_fd)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
            os.close(tmp_fd)

    def delete(self, digest: Digest) -> bool:
        try:
            os.unlink(self.blob_path(digest))
        except FileNotFoundError:
            return False
        return True

    def list(self, after: str, limit: int) -> list[tuple[Digest, int]]:
        found: list[tuple[Digest, int]] = []
        blobs = os.path.join(self.root, "blobs")
        for algorithm in sorted(ALGORITHMS, key=lambda a: a + ":"):
            # Every digest of a shard starts with "<algorithm>:<shard>" and sorts below that
            # followed by "~" (above all hex digits): skip whole shards that end before `after`.
            try:
                shards = sorted(os.listdir(os.path.join(blobs, algorithm)))
            except FileNotFoundError:
                continue
            for shard in shards:
                if f"{algorithm}:{shard}~" <= after:
                    continue
                shard_dir = os.path.join(blobs, algorithm, shard)
                try:
                    names = sorted(os.listdir(shard_dir))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                for name in names:
                    text = f"{algorithm}:{name}"
                    if text <= after or not self._is_blob_name(algorithm, shard, name):
                        continue
                    try:
                        size = os.stat(os.path.join(shard_dir, name)).st_size
                    except FileNotFoundError:  # deleted meanwhile
                        continue
                    found.append((Digest(algorithm, name), size))
                    if len(found) >= limit:
                        return found
        return found

    @staticmethod
    def _is_blob_name(algorithm: str, shard: str, name: str) -> bool:
        return len(name) == ALGORITHMS[algorithm] and name[:2] == shard and set(name) <= _HEX

    # --- uploads ---

    def upload_size(self, upload_id: str) -> int | None:
        try:
            return os.stat(self.upload_data_path(upload_id)).st_size
        except FileNotFoundError:
            return None

    def open_upload(
        self, upload_id: str, create_with: str | None = None
    ) -> FileStagedUpload | None:
        directory = self.upload_dir(upload_id)
        data_path = os.path.join(directory, "data")
        self.claims.claim(upload_id)
        try:
            fd = self._open_locked(upload_id, directory, data_path, create_with is not None)
            if fd is None:
                self.claims.release(upload_id)
                return None
            try:
                algorithm, generation = self._upload_info(directory, create_with)
                return FileStagedUpload(self, upload_id, fd, algorithm, generation)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            self.claims.release(upload_id)
            raise

    @staticmethod
    def _open_locked(upload_id: str, directory: str, data_path: str, create: bool) -> int | None:
        """Opens and flocks the data file; None when the upload does not exist (and not
        ``create``). Retries when the file was replaced between our open and our lock."""
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        for _attempt in range(10):
            if create:
                os.makedirs(directory, exist_ok=True)
            try:
                fd = os.open(data_path, flags, 0o644)
            except FileNotFoundError:
                if create:
                    continue  # the directory was removed under us by a discard: again
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise busy(upload_id) from None
            # The holder we waited for may have committed or aborted (unlinking this file).
            opened = os.fstat(fd)
            try:
                current = os.stat(data_path)
                same = (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)
            if not create:
                return None
        raise OSError(errno.EAGAIN, f"upload {upload_id} keeps being replaced")

    @staticmethod
    def _upload_info(directory: str, create_with: str | None) -> tuple[str, str]:
        """The upload's algorithm and generation (we hold its lock), written when missing."""
        path = os.path.join(directory, "info")
        try:
            with open(path, encoding="ascii") as f:
                fields = f.read().split()
            if len(fields) == 2 and fields[0] in ALGORITHMS:
                return fields[0], fields[1]
        except FileNotFoundError:
            pass
        # New, or a crash lost the file before it was written: the default algorithm.
        algorithm, generation = create_with or "sha256", secrets.token_hex(8)
        with open(path, "w", encoding="ascii") as f:
            f.write(f"{algorithm} {generation}\n")
        return algorithm, generation
