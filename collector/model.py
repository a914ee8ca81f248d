"""What the collector works with: plain values, and the two interfaces it needs.

:class:`LinkIndex` is the part of linksvc's API the collector calls, :class:`BlobStorage` the
part of blobsvc's. Both raise :class:`linkedblob.errors.LinkedBlobError` for a failed call (the
gRPC adapters convert once, in collector.grpc_backends); times are unix seconds (float).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class BlobState(enum.StrEnum):
    ACTIVE = "active"
    MARKED = "marked"
    DELETING = "deleting"


class SessionState(enum.StrEnum):
    ACTIVE = "active"
    COMMITTED = "committed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class IndexedBlob:
    """A blob of linksvc's index."""

    digest: str
    size: int
    state: BlobState
    since: float  # when it entered its state
    version: int  # the compare-and-set token of fence and forget


@dataclass(frozen=True, slots=True)
class Fence:
    fenced: bool
    blob: IndexedBlob | None  # the row as it is now (None: no longer indexed)


@dataclass(frozen=True, slots=True)
class MarkResult:
    marked: int
    revived: int


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    repository: str
    state: SessionState
    updated_at: float


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A blob as blobsvc stores it."""

    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class StagedUpload:
    """A staging area in blobsvc: its size and its last write."""

    upload_id: str
    size: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class LockState:
    acquired: bool
    holder: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    next_token: str = ""


@dataclass(frozen=True, slots=True)
class LinkedDigest:
    """One link of a repository."""

    repository: str
    digest: str
    size: int


class LinkIndex(Protocol):
    """linksvc, as the collector and fsck use it."""

    def mark_unreferenced(self) -> MarkResult: ...

    def list_collectable(
        self, grace: float, takeover: float, page_size: int, token: str
    ) -> Page[IndexedBlob]: ...

    def fence_blob(self, digest: str, version: int) -> Fence: ...

    def forget_blob(self, digest: str, version: int) -> bool: ...

    def adopt_blob(self, digest: str, size: int) -> bool: ...

    def list_blobs(self, page_size: int, token: str) -> Page[IndexedBlob]: ...

    def acquire_runner_lock(self, name: str, holder: str, ttl: float) -> LockState: ...

    def release_runner_lock(self, name: str, holder: str) -> None: ...

    def list_stale_sessions(self, older_than: float, limit: int) -> list[Session]:
        """Sessions (any state) not updated for ``older_than`` seconds, oldest first."""
        ...

    def get_session(self, session_id: str) -> Session:
        """NOT_FOUND / BLOB_UPLOAD_UNKNOWN for an unknown id."""
        ...

    def finish_session(self, session_id: str, state: SessionState) -> Session:
        """FAILED_PRECONDITION when finished in the other state; a no-op in the same one."""
        ...

    def purge_session(self, session_id: str) -> None: ...

    def list_repositories(self, page_size: int, token: str) -> Page[str]: ...

    def list_links(self, repository: str, page_size: int, token: str) -> Page[LinkedDigest]: ...


class BlobStorage(Protocol):
    """blobsvc, as the collector and fsck use it."""

    def delete(self, digest: str, timeout: float) -> bool:
        """Removes a blob's bytes, within ``timeout`` seconds; idempotent."""
        ...

    def abort(self, upload_id: str) -> None:
        """Drops a staging area; idempotent."""
        ...

    def stored_size(self, digest: str) -> int | None:
        """The size of a stored blob; None when it is not stored."""
        ...

    def list_blobs(self, page_size: int, token: str) -> Page[StoredBlob]: ...

    def list_uploads(self, page_size: int, token: str) -> Page[StagedUpload]: ...

    def upload_status(self, upload_id: str) -> StagedUpload:
        """NOT_FOUND / BLOB_UPLOAD_UNKNOWN when there is no such staging area."""
        ...


def pages(fetch: Callable[[int, str], Page[T]], page_size: int) -> Iterator[T]:
    """Every item of a paged list, page after page."""
    token = ""
    while True:
        page = fetch(page_size, token)
        yield from page.items
        if not page.next_token:
            return
        token = page.next_token
