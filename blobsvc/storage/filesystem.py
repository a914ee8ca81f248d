"""The filesystem driver: blobs and staged uploads under one root directory.

    ROOT/blobs/<algorithm>/<first 2 hex>/<hex>   committed blobs (never rewritten), sharded
    ROOT/uploads/<upload id>/data                an upload's staged bytes (append-only)
    ROOT/uploads/<upload id>/info                "<algorithm> <generation>" of the upload
    ROOT/tmp/                                    Put's temporary files

A blob appears under its name only complete and fsynced: the staged (or temporary) file is
fsynced, hard-linked to its final name (atomic, and never replaces an existing blob, so
concurrent commits of the same digest leave exactly one copy and each learns whether it was
first), and the directory is fsynced. Upload ids are validated against a strict grammar
before they name a path, and digests are parsed, so no request can reach outside the root.

An upload is held exclusively by one open file description: an in-process claim plus an
``flock`` on its data file, so two blobsvc replicas sharing the root cannot interleave writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import secrets
import tempfile
import time
from collections.abc import Callable

from blobsvc.storage import Storage, UploadClaims, busy, validate_upload_id
from linkedblob.digests import ALGORITHMS, Digest

_HEX = frozenset("0123456789abcdef")

# Staged bytes are pushed towards the disk every this many bytes (see _writeback_starter).
WRITEBACK_BYTES = 8 * 1024 * 1024


def _writeback_starter() -> Callable[[int, int, int], None]:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): starts writing a range of a file to
    disk without waiting for it. Done as an upload streams in, the fsync at commit finds
    little left to write (it otherwise writes the whole blob then: ~0.1 s per 100 MiB here).
    A no-op where libc lacks it; errors are ignored (the fsync still decides durability)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        sync_file_range = libc.sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, length: None
    sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    sync_file_range.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int, offset: int, length: int) -> None:
        sync_file_range(fd, offset, length, write)

    return start


_start_writeback = _writeback_starter()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _link_into_place(source: str, target: str) -> bool:
    """Hard-links ``source`` (complete, fsynced) to ``target``; True when target existed."""
    try:
        os.link(source, target)
    except FileExistsError:
        return True
    except FileNotFoundError:
        # First blob of this shard: create the shard directory (durably), then retry.
        shard = os.path.dirname(target)
        os.makedirs(shard, exist_ok=True)
        _fsync_dir(os.path.dirname(shard))
        _fsync_dir(os.path.dirname(os.path.dirname(shard)))
        try:
            os.link(source, target)
        except FileExistsError:
            return True
    _fsync_dir(os.path.dirname(target))
    return False


class FileBlobReader:
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._size = os.fstat(fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FileStagedUpload:
    """An upload's data file, open and flocked; ``size`` is tracked while we hold it."""

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
        try:
            _write_all(self._fd, data)
        except BaseException:
            self._size = os.fstat(self._fd).st_size  # after a partial write the file is the truth
            raise
        self._size += len(data)
        if self._size - self._written_back >= WRITEBACK_BYTES:
            _start_writeback(self._fd, self._written_back, self._size - self._written_back)
            self._written_back = self._size

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def store_as(self, digest: Digest) -> bool:
        target = self._storage.blob_path(digest)
        if os.path.exists(target):
            self.discard()
            return True
        os.fsync(self._fd)
        existed = _link_into_place(self._storage.upload_data_path(self._upload_id), target)
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

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also releases the flock
            self._fd = -1
            self._storage.claims.release(self._upload_id)


class FilesystemStorage(Storage):
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.claims = UploadClaims()
        for sub in ("blobs", "uploads", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._sweep_tmp()

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
            return FileBlobReader(fd)
        except BaseException:
            os.close(fd)
            raise

    def put(self, digest: Digest, data: bytes) -> bool:
        target = self.blob_path(digest)
        if os.path.exists(target):
            return True
        fd, tmp = tempfile.mkstemp(dir=os.path.join(self.root, "tmp"), prefix="put-")
        try:
            try:
                os.fchmod(fd, 0o644)  # like staged files (mkstemp makes 0600)
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return _link_into_place(tmp, target)
        finally:
            os.unlink(tmp)

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
