"""The empty blob as a storage wrapper: present for every algorithm, never stored."""

from __future__ import annotations

from blobsvc.storage import BlobReader, StagedUpload, Storage
from blobsvc.storage.forwarding import ForwardingStagedUpload, ForwardingStorage
from linkedblob.digests import Digest


class EmptyBlobStorage(ForwardingStorage):
    def __init__(self, base: Storage) -> None:
        """Answers for the empty blob (zero bytes, any algorithm) itself: stat says 0, a read
        gives no bytes, and a Put or a commit of it stores nothing and reports it already
        stored. Everything else goes to ``base``.

        Why: OCI clients reference the empty blob (an empty layer, an artifact's empty
        config) without always pushing it, and expect a registry to have it. Storing it would cost a
        file and its fsyncs per algorithm for nothing, and answering for it in the blob store
        took a special case in each of stat, find-missing, read, put and commit. The driver
        below never sees the empty digest, except in delete and list, which go through
        unchanged: deleting it deletes nothing, and it is never listed."""
        super().__init__(base)

    def stat(self, digest: Digest) -> int | None:
        return 0 if digest.is_empty else self.base.stat(digest)

    def open_blob(self, digest: Digest) -> BlobReader | None:
        return _EmptyReader() if digest.is_empty else self.base.open_blob(digest)

    def put(self, digest: Digest, data: bytes) -> bool:
        return True if digest.is_empty else self.base.put(digest, data)

    def open_upload(self, upload_id: str, create_with: str | None = None) -> StagedUpload | None:
        upload = self.base.open_upload(upload_id, create_with)
        return None if upload is None else _EmptyBlobUpload(upload)


class _EmptyReader:
    size = 0

    def read_at(self, offset: int, length: int) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _EmptyBlobUpload(ForwardingStagedUpload):
    def store_as(self, digest: Digest) -> bool:
        if digest.is_empty:  # verified by the caller: nothing was staged
            self.base.discard()
            return True
        return self.base.store_as(digest)
