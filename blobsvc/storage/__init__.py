"""The storage driver interface: where blobsvc keeps committed blobs and staged uploads.

Driver words, not domain words: a driver stores the bytes it is given under the digest it is
given; the blob store (blobsvc.store.BlobStore, the domain) hashes, verifies and enforces the
upload protocol before it asks a driver for anything.

One interface, ``Storage``, composed of small roles (as containerd composes its content
``Store`` from ``Provider``, ``Ingester`` and ``Manager``): ``Provider`` reads blobs,
``Ingester`` stores them (whole, or staged in resumable uploads), ``Manager`` lists and
deletes them. A driver is synchronous and thread-safe; the blob store calls it from worker
threads so the event loop never blocks on I/O.

Drivers: ``filesystem`` (the default, blobsvc.storage.filesystem) and ``memory`` (tests,
blobsvc.storage.memory). Behaviour common to every driver is a wrapper around one
(blobsvc.storage.forwarding): the empty blob (blobsvc.storage.empty_blob) and metrics
(blobsvc.storage.metrics); ``open_storage`` stacks them. Every driver and the stack pass one
contract suite (blobsvc.storage.contract).
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import Protocol

from linkedblob.digests import Digest
from linkedblob.errors import Reason, aborted, invalid_argument
from linkedblob.names import is_upload_id


def validate_upload_id(upload_id: str) -> str:
    """Returns the id when it is well formed; INVALID_ARGUMENT / BLOB_UPLOAD_INVALID otherwise."""
    # Upload ids come from callers and name staging paths: the grammar keeps them in the root.
    if not is_upload_id(upload_id):
        raise invalid_argument(
            Reason.BLOB_UPLOAD_INVALID,
            f"malformed upload id {upload_id[:200]!r}: 1-128 characters of [A-Za-z0-9_-]",
        )
    return upload_id


@dataclass(frozen=True, slots=True)
class UploadInfo:
    """A staging area as listed: its upload id, bytes staged, and when it was last written
    (or created), in seconds since the epoch."""

    upload_id: str
    size: int
    updated_at: float


class BlobReader(Protocol):
    """An open, immutable blob. Reads stay valid even if the blob is deleted meanwhile."""

    @property
    def size(self) -> int: ...

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (fewer only at the end)."""
        ...

    def close(self) -> None: ...


class StagedUpload(Protocol):
    """An upload's staging area, held exclusively (one holder, across processes) until close()."""

    @property
    def upload_id(self) -> str: ...

    @property
    def algorithm(self) -> str:
        """The hash algorithm the upload was started with."""
        ...

    @property
    def size(self) -> int:
        """Bytes staged so far."""
        ...

    @property
    def generation(self) -> str:
        """Random and fixed for the life of the staging area: an upload id aborted and started
        again (maybe by another replica) gets a new one, so hash state kept in memory for the
        old one is never applied to the new bytes."""
        ...

    def append(self, data: bytes | memoryview) -> None:
        """Appends all of ``data`` at the end of the staged bytes."""
        ...

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` staged bytes from ``offset``."""
        ...

    def store_as(self, digest: Digest) -> bool:
        """Moves the staged bytes into the store under ``digest`` (verified by the caller),
        durably and atomically, and removes the staging area. Returns True when the blob was
        already stored (the staged copy is then just dropped)."""
        ...

    def discard(self) -> None:
        """Removes the staging area and its bytes."""
        ...

    def close(self) -> None:
        """Releases the upload (it stays staged unless stored or discarded)."""
        ...


class Provider(Protocol):
    """Reads committed blobs."""

    @abc.abstractmethod
    def stat(self, digest: Digest) -> int | None:
        """The blob's size, or None when it is not stored."""

    @abc.abstractmethod
    def open_blob(self, digest: Digest) -> BlobReader | None:
        """Opens a stored blob for reading, or None when it is not stored."""


class Ingester(Protocol):
    """Stores blobs: whole (small ones), or staged in resumable uploads and then moved in."""

    @abc.abstractmethod
    def put(self, digest: Digest, data: bytes) -> bool:
        """Stores ``data`` (verified by the caller) under ``digest``, atomically. Returns True
        when it was already stored."""

    @abc.abstractmethod
    def upload_size(self, upload_id: str) -> int | None:
        """Bytes staged for an upload (without taking it), or None when it is unknown."""

    @abc.abstractmethod
    def upload_info(self, upload_id: str) -> UploadInfo | None:
        """An upload's size and last write (without taking it), or None when it is unknown."""

    @abc.abstractmethod
    def list_uploads(self, after: str, limit: int) -> list[UploadInfo]:
        """Up to ``limit`` staging areas whose upload id sorts after ``after`` ("" for the
        first page), in upload id order, without taking any of them: a held upload is listed
        as it stands (its size may be behind a write in flight)."""

    @abc.abstractmethod
    def open_upload(self, upload_id: str, create_with: str | None = None) -> StagedUpload | None:
        """Takes an upload exclusively. An unknown id is created (empty, hashing with the
        algorithm ``create_with``) when ``create_with`` is given, else None is returned.
        Raises ABORTED / BLOB_UPLOAD_INVALID while another holder has it."""


class Manager(Protocol):
    """Lists and deletes committed blobs."""

    @abc.abstractmethod
    def delete(self, digest: Digest) -> bool:
        """Removes a blob; False when it was not stored."""

    @abc.abstractmethod
    def list(self, after: str, limit: int) -> list[tuple[Digest, int]]:
        """Up to ``limit`` stored blobs (digest, size) whose digest string sorts after
        ``after`` ("" for the first page), in digest string order."""


class Storage(Provider, Ingester, Manager, Protocol):
    """A storage driver (or a wrapper around one): every role, and a close."""

    def close(self) -> None:
        """Releases the driver's resources (nothing, unless a driver says otherwise)."""
        return None


class UploadClaims:
    """The in-process half of an upload's exclusivity: which upload ids are held right now.

    (The filesystem driver adds an flock on the staging file for other processes.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[str] = set()

    def claim(self, upload_id: str) -> None:
        with self._lock:
            if upload_id in self._held:
                raise busy(upload_id)
            self._held.add(upload_id)

    def release(self, upload_id: str) -> None:
        with self._lock:
            self._held.discard(upload_id)


def busy(upload_id: str) -> Exception:
    return aborted(
        Reason.BLOB_UPLOAD_INVALID,
        f"upload {upload_id} is being written or committed by another stream; retry later",
    )


def open_driver(kind: str, root: str, direct_io: bool = True) -> Storage:
    """The bare driver named by ``--storage`` (``direct_io``: see FilesystemStorage)."""
    if kind == "filesystem":
        from blobsvc.storage.filesystem import FilesystemStorage

        return FilesystemStorage(root, direct_io=direct_io)
    if kind == "memory":
        from blobsvc.storage.memory import MemoryStorage

        return MemoryStorage()
    raise ValueError(f"unknown storage driver {kind!r}")


def with_wrappers(driver: Storage, driver_name: str) -> Storage:
    """``driver`` with the behaviour every driver gets, outermost first:

    - EmptyBlobStorage: the empty blob is present without being stored;
    - MetricsStorage: latency and bytes of the driver's own actions, labelled ``driver_name``
      (inside the empty-blob wrapper, so it counts only what reaches the driver)."""
    from blobsvc.storage.empty_blob import EmptyBlobStorage
    from blobsvc.storage.metrics import MetricsStorage

    return EmptyBlobStorage(MetricsStorage(driver, driver_name))


def open_storage(kind: str, root: str, direct_io: bool = True) -> Storage:
    """The driver named by ``--storage``, with its wrappers (see with_wrappers)."""
    return with_wrappers(open_driver(kind, root, direct_io), kind)
