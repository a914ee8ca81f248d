"""The base of storage wrappers: a Storage (and a StagedUpload) that forwards every call.

A wrapper adds one behaviour to any driver (as Buildbarn's BlobAccess decorators and
distribution's ``base.Base`` do) by overriding only the calls that behaviour concerns.
"""

from __future__ import annotations

from blobsvc.storage import BlobReader, StagedUpload, Storage, UploadInfo
from linkedblob.digests import Digest


class ForwardingStorage(Storage):
    """Forwards every call to ``base``."""

    def __init__(self, base: Storage) -> None:
        self.base = base

    def stat(self, digest: Digest) -> int | None:
        return self.base.stat(digest)

    def open_blob(self, digest: Digest) -> BlobReader | None:
        return self.base.open_blob(digest)

    def put(self, digest: Digest, data: bytes) -> bool:
        return self.base.put(digest, data)

    def upload_size(self, upload_id: str) -> int | None:
        return self.base.upload_size(upload_id)

    def upload_info(self, upload_id: str) -> UploadInfo | None:
        return self.base.upload_info(upload_id)

    def list_uploads(self, after: str, limit: int) -> list[UploadInfo]:
        return self.base.list_uploads(after, limit)

    def open_upload(self, upload_id: str, create_with: str | None = None) -> StagedUpload | None:
        return self.base.open_upload(upload_id, create_with)

    def delete(self, digest: Digest) -> bool:
        return self.base.delete(digest)

    def list(self, after: str, limit: int) -> list[tuple[Digest, int]]:
        return self.base.list(after, limit)

    def close(self) -> None:
        self.base.close()


class ForwardingStagedUpload(StagedUpload):
    """Forwards every call to ``base``."""

    def __init__(self, base: StagedUpload) -> None:
        self.base = base

    @property
    def upload_id(self) -> str:
        return self.base.upload_id

    @property
    def algorithm(self) -> str:
        return self.base.algorithm

    @property
    def size(self) -> int:
        return self.base.size

    @property
    def generation(self) -> str:
        return self.base.generation

    def append(self, data: bytes | memoryview) -> None:
        self.base.append(data)

    def read_at(self, offset: int, length: int) -> bytes:
        return self.base.read_at(offset, length)

    def store_as(self, digest: Digest) -> bool:
        return self.base.store_as(digest)

    def discard(self) -> None:
        self.base.discard()

    def close(self) -> None:
        self.base.close()
