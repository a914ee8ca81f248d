"""Staged uploads on the filesystem: exclusivity (an in-process claim plus an flock on the data
file, so two replicas sharing the root cannot interleave writes) and appends (with direct
I/O: whole blocks with O_DIRECT, a partial last block through the page cache).

    ROOT/uploads/<upload id>/data   an upload's staged bytes (append-only)
    ROOT/uploads/<upload id>/info   "<algorithm> <generation>" of the upload

A staging area's size and last write are its data file's size and mtime, read with stat(2):
listing opens nothing and takes no lock, so it never waits for (or disturbs) a holder. Every
append changes the mtime (O_DIRECT writes too), and creating the file sets it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import os
import secrets
from typing import TYPE_CHECKING

from blobsvc.storage import UploadInfo, busy
from blobsvc.storage.filesystem.direct_io import pwrite_all
from blobsvc.storage.filesystem.durable import (
    link_into_place,
    start_writeback,
    store_unless_present,
    write_all,
)
from linkedblob.digests import ALGORITHMS, Digest
from linkedblob.names import is_upload_id

if TYPE_CHECKING:
    from blobsvc.storage.filesystem.storage import FilesystemStorage


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
        self._writeback_bytes = storage.writeback_bytes
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
            write_all(self._fd, data)
        except BaseException:
            self._size = os.fstat(self._fd).st_size  # after a partial write the file is the truth
            raise
        self._size += len(data)
        if self._size - self._written_back >= self._writeback_bytes:
            start_writeback(self._fd, self._written_back, self._size - self._written_back)
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
                    pwrite_all(self._direct_fd, view[:whole], base)
                if whole < filled:  # appended at the end of the file (O_APPEND)
                    write_all(self._fd, view[max(whole, carried) : filled])
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
        def link(shard_fd: int, name: str) -> bool:
            os.fsync(self._fd)
            source = self._storage.upload_data_path(self._upload_id)
            return link_into_place(source, shard_fd, name)

        existed = store_unless_present(self._storage.blob_path(digest), link)
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


def open_upload(
    storage: FilesystemStorage, upload_id: str, create_with: str | None
) -> FileStagedUpload | None:
    """Takes the upload (see Storage.open_upload): claimed in this process, flocked for others."""
    directory = storage.upload_dir(upload_id)
    data_path = os.path.join(directory, "data")
    storage.claims.claim(upload_id)
    try:
        fd = _open_locked(upload_id, directory, data_path, create_with is not None)
        if fd is None:
            storage.claims.release(upload_id)
            _remove_leftover(directory)
            return None
        try:
            algorithm, generation = _upload_info(directory, create_with)
            return FileStagedUpload(storage, upload_id, fd, algorithm, generation)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        storage.claims.release(upload_id)
        raise


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


def _remove_leftover(directory: str) -> None:
    """Removes a staging directory left empty: what a crash between creating the directory and
    its data file, or between a discard's unlinks and its rmdir, leaves (a discard unlinks the
    info file first), and nothing else would ever remove. rmdir removes only an empty
    directory, so a creator's files are never touched; a creator that finds its directory gone
    makes it again (_open_locked)."""
    with contextlib.suppress(OSError):  # absent, or not empty: in use
        os.rmdir(directory)


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


def upload_info(storage: FilesystemStorage, upload_id: str) -> UploadInfo | None:
    """The upload's size and last write from its data file's metadata (no open, no lock)."""
    try:
        st = os.stat(storage.upload_data_path(upload_id))
    except FileNotFoundError:
        return None
    return UploadInfo(upload_id, st.st_size, st.st_mtime_ns / 1e9)


def list_uploads(storage: FilesystemStorage, after: str, limit: int) -> list[UploadInfo]:
    """See Storage.list_uploads. A directory without a data file (being created or removed) is
    not a staging area and is skipped; one left empty by a crash is removed on the way."""
    root = os.path.join(storage.root, "uploads")
    found: list[UploadInfo] = []
    while len(found) < limit:
        # The next names only (not a sort of them all); again if some were not staging areas.
        with os.scandir(root) as entries:
            candidates = (e.name for e in entries if e.name > after and is_upload_id(e.name))
            names = heapq.nsmallest(limit - len(found), candidates)
        if not names:
            break
        for name in names:
            try:
                st = os.stat(os.path.join(root, name, "data"))
            except (FileNotFoundError, NotADirectoryError):
                _remove_leftover(os.path.join(root, name))
                continue
            found.append(UploadInfo(name, st.st_size, st.st_mtime_ns / 1e9))
        after = names[-1]
    return found
