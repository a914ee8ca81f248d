"""What the gateway's domain needs of blobsvc and linksvc: two interfaces, free of gRPC.

The domain (gateway.registry, gateway.uploads) calls only these; failures are
:class:`~linkedblob.errors.LinkedBlobError` with the code and reason the service answered. The
implementations: gateway.grpc_blob and gateway.grpc_link (the services over gRPC, where
grpc.RpcError becomes LinkedBlobError, once), gateway.linkcache.CachedLinks (a LinkBackend
remembering resolved links), and gateway.fakes (in memory, for tests).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from gateway.model import (
    BlobDescriptor,
    CommitSpec,
    IncomingData,
    Lease,
    LinkedBlob,
    OutgoingData,
    Page,
    SessionState,
    UploadSession,
    Written,
)


class BlobBackend(Protocol):
    """blobsvc: bytes by digest, and the staging areas of uploads."""

    async def stat(self, digest: str) -> BlobDescriptor:
        """NOT_FOUND / BLOB_UNKNOWN when the store does not hold ``digest``."""
        ...

    async def put(self, data: bytes, digest: str, counted_as: str = "") -> BlobDescriptor:
        """Stores a whole blob (checked against ``digest`` unless it is ""). ``counted_as``: the
        public method the bytes came in by, for the byte counters ("": not counted)."""
        ...

    async def open_read(
        self, digest: str, offset: int, length: int, out: OutgoingData
    ) -> AsyncGenerator[bytes, None]:
        """Opens a read of ``length`` bytes from ``offset`` (NOT_FOUND / BLOB_UNKNOWN when the
        store does not hold ``digest``), then yields them as ``out`` asks; DATA_LOSS when the
        store has fewer."""
        ...

    async def write(
        self,
        upload_id: str,
        offset: int,
        data: bytes,
        incoming: IncomingData | None = None,
        commit: CommitSpec | None = None,
        counted_as: str = "",
        want_staged_digest: bool = False,
    ) -> Written:
        """Appends ``data`` and then ``incoming``'s data to a staging area at ``offset``
        (OUT_OF_RANGE / BLOB_UPLOAD_INVALID with metadata ``size`` when that is not its size;
        offset 0 creates one; past 0 on none: NOT_FOUND / BLOB_UPLOAD_UNKNOWN), then commits it
        when ``commit`` is given; without ``commit``, ``want_staged_digest`` answers the digest
        of all the staged bytes (Written.staged_digest, the upload's algorithm). Each of
        ``incoming``'s messages goes through its ``check_size``. The bytes are counted under
        ``incoming.method``, else under ``counted_as`` ("": not counted)."""
        ...

    async def upload_size(self, upload_id: str) -> int:
        """The bytes staged; NOT_FOUND / BLOB_UPLOAD_UNKNOWN when nothing is."""
        ...

    async def commit(self, upload_id: str, digest: str) -> BlobDescriptor:
        """Moves the staged bytes into the store under ``digest`` (DIGEST_INVALID when they do
        not match, and they stay staged)."""
        ...

    async def abort(self, upload_id: str) -> None: ...


class LinkBackend(Protocol):
    """linksvc: the blob index, repositories' links, and upload sessions."""

    async def stat_blob(self, digest: str) -> BlobDescriptor:
        """The recorded blob; NOT_FOUND / BLOB_UNKNOWN when it is not recorded."""
        ...

    async def lease(
        self,
        digest: str,
        ttl: float,
        link_repository: str = "",
        media_type: str = "",
        size: int | None = None,
    ) -> Lease | LinkedBlob:
        """Protects ``digest`` from garbage collection for ``ttl`` seconds while its bytes are
        committed and linked: a Lease for :meth:`link`. With ``link_repository`` and a recorded
        live blob, links it at once instead (with ``media_type``; ``size``, when given, must be
        the recorded one: INVALID_ARGUMENT / SIZE_INVALID with metadata ``size``) and answers
        the LinkedBlob. A marked blob is revived; one being deleted is ABORTED /
        BLOB_DELETING."""
        ...

    async def release_lease(self, digest: str, lease_id: str) -> bool:
        """Gives back the lease ``lease_id`` of ``digest`` (from :meth:`lease`) that the
        caller will not use: its call failed before the link. Only that lease goes; other
        leases of the digest stay. Idempotent: False when there was no such lease (consumed by
        a link, released already, expired)."""
        ...

    async def link(
        self,
        repository: str,
        digest: str,
        media_type: str,
        size: int | None = None,
        finish_session: str = "",
        lease_id: str = "",
    ) -> LinkedBlob:
        """Links a recorded blob (with ``size``: records it first, which needs the live lease
        ``lease_id`` of the digest, else ABORTED / BLOB_UPLOAD_INVALID: upload again), and
        finishes ``finish_session`` as committed, in one transaction; the lease is consumed. A
        marked blob is revived; one being deleted is ABORTED / BLOB_DELETING."""
        ...

    async def resolve(self, repository: str, digest: str, fresh: bool = False) -> LinkedBlob:
        """NOT_FOUND / BLOB_UNKNOWN when ``repository`` does not link ``digest``. ``fresh``:
        asks linksvc itself, whatever a cache in front of it remembers."""
        ...

    async def unlink(self, repository: str, digest: str) -> None: ...

    async def mount(self, repository: str, source: str, digest: str, media_type: str) -> LinkedBlob:
        """Links a blob ``source`` links (any repository when "")."""
        ...

    async def list_links(
        self, repository: str, page_size: int, page_token: str
    ) -> Page[LinkedBlob]: ...

    async def list_repositories(self, page_size: int, page_token: str) -> Page[str]: ...

    async def list_linking_repositories(
        self, digest: str, page_size: int, page_token: str
    ) -> Page[str]:
        """The repositories that link ``digest``, in name order, paged (an unknown digest: an
        empty page)."""
        ...

    async def create_session(self, repository: str) -> UploadSession: ...

    async def list_sessions(
        self, repository: str, page_size: int, page_token: str
    ) -> Page[UploadSession]:
        """``repository``'s active sessions in id order, paged."""
        ...

    async def get_session(self, upload_id: str) -> UploadSession:
        """NOT_FOUND / BLOB_UPLOAD_UNKNOWN for an unknown session."""
        ...

    async def advance_session(self, upload_id: str, from_size: int, to_size: int) -> None:
        """Sets the recorded size if it still is ``from_size``; ABORTED with metadata ``size``
        (the size another writer set) otherwise."""
        ...

    async def finish_session(self, upload_id: str, state: SessionState) -> None: ...

    def forget(self, repository: str, digest: str) -> None:
        """Told that the store lost the blob behind a link: whatever is remembered of that
        link is dropped (linksvc itself keeps nothing)."""
        ...
