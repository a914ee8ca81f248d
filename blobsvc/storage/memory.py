"""The memory driver (``--storage memory``): blobs and staged uploads in this process's memory.

For tests and throwaway setups: everything is lost when the process ends, and blobs are held
whole in memory (the bounded-memory guarantee is the filesystem driver's).
"""

from __future__ import annotations

import builtins
import secrets
import threading
import time
from dataclasses import dataclass, field

from blobsvc.storage import Storage, UploadClaims, UploadInfo, validate_upload_id
from linkedblob.digests import Digest


class MemoryBlobReader:
    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def read_at(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]

    def close(self) -> None:
        pass


@dataclass
class _Staging:
    algorithm: str
    data: bytearray = field(default_factory=bytearray)
    generation: str = field(default_factory=lambda: secrets.token_hex(8))
    updated_at: float = field(default_factory=time.time)  # the last append (or creation)


class MemoryStagedUpload:
    def __init__(self, storage: MemoryStorage, upload_id: str, staging: _Staging) -> None:
        self._storage = storage
        self._upload_id = upload_id
        self._staging = staging
        self._open = True

    @property
    def upload_id(self) -> str:
        return self._upload_id

    @property
    def algorithm(self) -> str:
        return self._staging.algorithm

    @property
    def size(self) -> int:
        return len(self._staging.data)

    @property
    def generation(self) -> str:
        return self._staging.generation

    def append(self, data: bytes | memoryview) -> None:
        with self._storage.lock:  # upload_size() reads concurrently
            self._staging.data += data
            self._staging.updated_at = time.time()

    def read_at(self, offset: int, length: int) -> bytes:
        with self._storage.lock:
            return bytes(self._staging.data[offset : offset + length])

    def store_as(self, digest: Digest) -> bool:
        with self._storage.lock:
            existed = str(digest) in self._storage.blobs
            if not existed:
                self._storage.blobs[str(digest)] = bytes(self._staging.data)
        self.discard()
        return existed

    def discard(self) -> None:
        with self._storage.lock:
            if self._storage.uploads.get(self._upload_id) is self._staging:
                del self._storage.uploads[self._upload_id]

    def close(self) -> None:
        if self._open:
            self._open = False
            self._storage.claims.release(self._upload_id)


class MemoryStorage(Storage):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.claims = UploadClaims()
        self.blobs: dict[str, bytes] = {}
        self.uploads: dict[str, _Staging] = {}

    def stat(self, digest: Digest) -> int | None:
        with self.lock:
            data = self.blobs.get(str(digest))
        return None if data is None else len(data)

    def open_blob(self, digest: Digest) -> MemoryBlobReader | None:
        with self.lock:
            data = self.blobs.get(str(digest))
        return None if data is None else MemoryBlobReader(data)

    def put(self, digest: Digest, data: bytes) -> bool:
        with self.lock:
            if str(digest) in self.blobs:
                return True
            self.blobs[str(digest)] = bytes(data)
            return False

    def delete(self, digest: Digest) -> bool:
        with self.lock:
            return self.blobs.pop(str(digest), None) is not None

    def list(self, after: str, limit: int) -> list[tuple[Digest, int]]:
        with self.lock:
            names = sorted(name for name in self.blobs if name > after)[:limit]
            sizes = [len(self.blobs[name]) for name in names]
        return [
            (Digest(*name.split(":", 1)), size) for name, size in zip(names, sizes, strict=True)
        ]

    def upload_size(self, upload_id: str) -> int | None:
        validate_upload_id(upload_id)
        with self.lock:
            staging = self.uploads.get(upload_id)
            return None if staging is None else len(staging.data)

    def upload_info(self, upload_id: str) -> UploadInfo | None:
        validate_upload_id(upload_id)
        with self.lock:
            staging = self.uploads.get(upload_id)
            return None if staging is None else _info(upload_id, staging)

    def list_uploads(self, after: str, limit: int) -> builtins.list[UploadInfo]:
        with self.lock:
            names = sorted(name for name in self.uploads if name > after)[:limit]
            return [_info(name, self.uploads[name]) for name in names]

    def open_upload(
        self, upload_id: str, create_with: str | None = None
    ) -> MemoryStagedUpload | None:
        self.claims.claim(validate_upload_id(upload_id))
        with self.lock:
            staging = self.uploads.get(upload_id)
            if staging is None and create_with is not None:
                staging = self.uploads[upload_id] = _Staging(create_with)
        if staging is None:
            self.claims.release(upload_id)
            return None
        return MemoryStagedUpload(self, upload_id, staging)


def _info(upload_id: str, staging: _Staging) -> UploadInfo:
    return UploadInfo(upload_id, len(staging.data), staging.updated_at)
