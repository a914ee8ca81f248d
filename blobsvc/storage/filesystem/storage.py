"""The filesystem driver: blobs and staged uploads under one root directory.

    ROOT/blobs/<algorithm>/<first 2 hex>/<hex>   committed blobs (never rewritten), sharded
    ROOT/uploads/<upload id>/                    staged uploads (see .uploads)
    ROOT/tmp/                                    Put's temporary files (where O_TMPFILE fails)

A blob appears under its name only complete and fsynced (see .durable); Put writes it to an
anonymous file made ahead (see .anonymous_files). Upload ids are validated against a strict
grammar before they name a path, and digests are parsed, so no request can reach outside the
root. Staged bytes and uncached reads bypass the page cache (see .direct_io); a blob read
again while remembered is read into it (see .read_admission).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import secrets
import time

from blobsvc.storage import Storage, UploadClaims, UploadInfo, validate_upload_id
from blobsvc.storage.filesystem import uploads
from blobsvc.storage.filesystem.anonymous_files import (
    ANONYMOUS_FILES_READY,
    AnonymousFiles,
    anonymous_files_work,
)
from blobsvc.storage.filesystem.direct_io import IDLE_DIRECT_BUFFERS, DirectIO
from blobsvc.storage.filesystem.durable import (
    WRITEBACK_BYTES,
    link_into_place,
    store_unless_present,
    write_all,
)
from blobsvc.storage.filesystem.read_admission import RECENT_READS, ReadAdmission
from blobsvc.storage.filesystem.uploads import FileStagedUpload
from linkedblob.digests import ALGORITHMS, Digest

_HEX = frozenset("0123456789abcdef")


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


class FilesystemStorage(Storage):
    def __init__(
        self,
        root: str,
        *,
        anonymous_files: bool = True,
        direct_io: bool = True,
        idle_direct_buffers: int = IDLE_DIRECT_BUFFERS,
        recent_reads: int = RECENT_READS,
        anonymous_files_ready: int = ANONYMOUS_FILES_READY,
        writeback_bytes: int = WRITEBACK_BYTES,
    ) -> None:
        """``anonymous_files``: False keeps Put to named temporary files (as where the
        filesystem has no O_TMPFILE). ``direct_io``: False sends staged bytes and reads
        through the page cache (see DirectIO). Tunables: ``idle_direct_buffers``, aligned
        buffers kept for reuse; ``recent_reads``, blobs remembered for admission to the page
        cache (see ReadAdmission); ``anonymous_files_ready``, files made ahead for Put;
        ``writeback_bytes``, how often staged bytes are pushed towards the disk."""
        self.root = os.path.abspath(root)
        self.claims = UploadClaims()
        self.writeback_bytes = writeback_bytes
        for sub in ("blobs", "uploads", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self.direct = DirectIO(self.root, direct_io, idle_direct_buffers)
        self._read_admission = ReadAdmission(recent_reads)
        self._sweep_tmp()
        tmp = os.path.join(self.root, "tmp")
        self._anonymous: AnonymousFiles | None = None
        if anonymous_files and anonymous_files_work(tmp):
            self._anonymous = AnonymousFiles(tmp, anonymous_files_ready)

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
            cache = self._read_admission.read_before(digest)
            return FileBlobReader(fd, self.direct, cache=cache)
        except BaseException:
            os.close(fd)
            raise

    def put(self, digest: Digest, data: bytes) -> bool:
        """Small blobs, so the fewest system calls: the bytes go to an anonymous file made
        ahead (AnonymousFiles), fsynced, then linked under the blob's name, and the shard
        fsynced. Where O_TMPFILE does not work, a named temporary file under ROOT/tmp does
        the same."""

        def link(shard_fd: int, name: str) -> bool:
            if self._anonymous is None:
                return self._put_named(data, shard_fd, name)
            fd = self._anonymous.take()
            try:
                write_all(fd, data)
                os.fsync(fd)
                return link_into_place(f"/proc/self/fd/{fd}", shard_fd, name)
            finally:
                os.close(fd)

        return store_unless_present(self.blob_path(digest), link)

    def _put_named(self, data: bytes, shard_fd: int, name: str) -> bool:
        tmp = os.path.join(self.root, "tmp", f"put-{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return link_into_place(tmp, shard_fd, name)
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

    def upload_info(self, upload_id: str) -> UploadInfo | None:
        return uploads.upload_info(self, upload_id)

    def list_uploads(self, after: str, limit: int) -> builtins.list[UploadInfo]:
        return uploads.list_uploads(self, after, limit)

    def open_upload(
        self, upload_id: str, create_with: str | None = None
    ) -> FileStagedUpload | None:
        return uploads.open_upload(self, upload_id, create_with)
