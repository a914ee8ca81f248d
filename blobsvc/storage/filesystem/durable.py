"""Durability on the filesystem: a blob appears under its name only complete and fsynced.

The bytes are written and fsynced under no name or a temporary one, hard-linked to the blob's
name (atomic, and never replacing a blob there, so concurrent commits of one digest leave
exactly one copy and each learns whether it was first), and the directory is fsynced.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

from linkedblob.libc import libc

# Staged bytes are pushed towards the disk every this many bytes, by default (see
# start_writeback).
WRITEBACK_BYTES = 8 * 1024 * 1024

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _writeback_starter() -> Callable[[int, int, int], None]:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): starts writing a range of a file to
    disk without waiting for it. Done as an upload streams in, the fsync at commit finds
    little left to write (it otherwise writes the whole blob then; measured: bench/README.md,
    section "blobsvc: durability"). A no-op where libc lacks it; errors are ignored (the fsync
    still decides durability)."""
    sync_file_range = getattr(libc(), "sync_file_range", None)
    if sync_file_range is None:
        return lambda fd, offset, length: None
    sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    sync_file_range.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int, offset: int, length: int) -> None:
        sync_file_range(fd, offset, length, write)

    return start


start_writeback = _writeback_starter()


def fsync_dir(path: str) -> None:
    fd = os.open(path, DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _open_shard(target: str) -> int:
    """An fd of the directory ``target`` goes in, created durably when it is the first blob of
    its shard (or of its algorithm)."""
    shard = os.path.dirname(target)
    try:
        return os.open(shard, DIR_FLAGS)
    except FileNotFoundError:
        os.makedirs(shard, exist_ok=True)
        fsync_dir(os.path.dirname(shard))
        fsync_dir(os.path.dirname(os.path.dirname(shard)))
        return os.open(shard, DIR_FLAGS)


def link_into_place(source: str, shard_fd: int, name: str) -> bool:
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


def store_unless_present(target: str, link: Callable[[int, str], bool]) -> bool:
    """Stores a blob at ``target`` unless it is there already: ``link(shard_fd, name)`` puts
    the complete, fsynced bytes in place (link_into_place) and says whether the name was
    taken meanwhile. True when the blob was already stored."""
    shard_fd = _open_shard(target)
    try:
        name = os.path.basename(target)
        if _exists_in(shard_fd, name):
            os.fsync(shard_fd)  # see link_into_place
            return True
        return link(shard_fd, name)
    finally:
        os.close(shard_fd)
