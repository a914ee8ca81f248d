"""The O_TMPFILE pool: empty anonymous files made ahead of need, for Put."""

from __future__ import annotations

import collections
import logging
import os
import secrets
import threading

from blobsvc.storage.filesystem.durable import DIR_FLAGS, link_into_place

log = logging.getLogger(__name__)

_ANONYMOUS_FLAGS = getattr(os, "O_TMPFILE", 0) | os.O_WRONLY | os.O_CLOEXEC
# Files kept ready, by default.
ANONYMOUS_FILES_READY = 16


def anonymous_files_work(directory: str) -> bool:
    """Whether this filesystem takes O_TMPFILE in ``directory``, and /proc lets us link such a
    file in."""
    tmp_fd = os.open(directory, DIR_FLAGS)
    try:
        fd = os.open(".", _ANONYMOUS_FLAGS, 0o644, dir_fd=tmp_fd)
    except OSError:
        os.close(tmp_fd)
        return False
    probe = f"probe-{secrets.token_hex(8)}"
    try:
        link_into_place(f"/proc/self/fd/{fd}", tmp_fd, probe)
        os.unlink(probe, dir_fd=tmp_fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.close(tmp_fd)


class AnonymousFiles:
    """Empty anonymous files (O_TMPFILE) made ahead of need, for Put.

    Creating an inode is the dearest step of storing a small blob (more kernel time than
    writing and fsyncing a few KiB; measured: bench/README.md, section "blobsvc: small blobs"),
    so a thread keeps a few ready, off the request's path. Anonymous files have no name until
    one is linked in: nothing to sweep after a crash, nothing a replica sharing the root can
    see.
    """

    def __init__(self, directory: str, keep: int = ANONYMOUS_FILES_READY) -> None:
        """``keep``: how many files are kept ready (refilled when fewer than half are left)."""
        self._dir_fd = os.open(directory, DIR_FLAGS)
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
