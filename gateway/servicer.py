"""linkedblob.v1.Registry: the public API, composed from blobsvc (bytes) and linksvc (links,
blob index, upload sessions) over gRPC.

Every method validates its request first (gateway.validation), then calls the backends, in the
order that keeps DESIGN.md's invariants: bytes durable in blobsvc, then recorded, then linked
(linksvc Link with `size` records and links in one transaction). Backend errors are relayed
with their code and reason by @servicer_method; an unreachable backend becomes UNAVAILABLE.

Access goes through links: a blob is stat'ed or read only after linksvc resolved the
repository's link, and an upload is used only through the repository that started it.
Resolved links are kept for a few seconds (gateway.linkcache), so a stat or a read of a blob
just seen costs no linksvc call.

Direct access (gateway.direct): with a grant secret, LocateBlob and direct uploads hand the
client blobsvc's address and a grant for one digest or one upload, after the same checks, so
bytes cross one hop; the gateway's own blobsvc calls then carry its internal grant.

The byte streams (ReadBlob, PushBlob, WriteUpload) handle data messages as raw bytes and re-tag
them for the next hop without parsing (linkedblob.wire); see gateway.server for the handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import empty_pb2

from gateway import validation
from gateway.backends import Backends
from gateway.blobwrite import WriteCall
from gateway.direct import DirectAccess
from gateway.linkcache import LinkCache
from linkedblob import metrics, wire
from linkedblob.blob.v1 import blob_pb2
from linkedblob.digests import Digest
from linkedblob.errors import (
    LinkedBlobError,
    Reason,
    error_info,
    failed_precondition,
    from_rpc_error,
    invalid_argument,
    not_found,
    out_of_range,
)
from linkedblob.link.v1 import link_pb2
from linkedblob.rpc import servicer_method
from linkedblob.v1 import registry_pb2

Context = grpc.aio.ServicerContext

# Field numbers of the data fields the streams relay.
_BLOB_READ_DATA = 1  # blob.v1.ReadResponse.data
_BLOB_WRITE_DATA = 3  # blob.v1.WriteRequest.data
_READ_BLOB_DATA = 2  # v1.ReadBlobResponse.data
_PUSH_BLOB_DATA = 2  # v1.PushBlobRequest.data
_WRITE_UPLOAD_DATA = 4  # v1.WriteUploadRequest.data

_ACTIVE = link_pb2.Session.ACTIVE
_COMMITTED = link_pb2.Session.COMMITTED

# Seconds after which a failed PushBlob's staging area is aborted a second time.
_ABORT_AGAIN_AFTER = 2.0

# How often a write retries linksvc's compare-and-set of the session size after losing a race.
_ADVANCE_ATTEMPTS = 4


def _descriptor(blob: link_pb2.Descriptor) -> registry_pb2.Descriptor:
    return registry_pb2.Descriptor(digest=blob.digest, size=blob.size, media_type=blob.media_type)


def _code(err: grpc.RpcError) -> grpc.StatusCode:
    return err.code()  # type: ignore[attr-defined,no-any-return]


def _reason(err: grpc.RpcError) -> str | None:
    info = error_info(err)
    return info.reason if info is not None else None


def _unknown_upload(upload_id: str) -> LinkedBlobError:
    return not_found(Reason.BLOB_UPLOAD_UNKNOWN, f"unknown upload {upload_id!r}")


def _push_data(raw: bytes) -> bytes:
    """The data of a PushBlob message that is not a plain data message (the slow path)."""
    msg = registry_pb2.PushBlobRequest.FromString(raw)
    if msg.HasField("header"):
        raise invalid_argument(
            Reason.BLOB_UPLOAD_INVALID, "only the first PushBlob message may carry the header"
        )
    return msg.data


def _write_upload_data(raw: bytes) -> bytes:
    """The data of a WriteUpload message that is not a plain data message (the slow path).

    The naming fields belong to the first message; later ones are read for their data only.
    """
    return registry_pb2.WriteUploadRequest.FromString(raw).data


class RegistryServicer:
    def __init__(
        self,
        backends: Backends,
        *,
        enable_delete: bool = False,
        direct: DirectAccess | None = None,
        cache: LinkCache[registry_pb2.Descriptor] | None = None,
    ) -> None:
        self._backends = backends
        self._blob = backends.blob
        self._link = backends.link
        self._enable_delete = enable_delete
        self._direct = direct if direct is not None else DirectAccess("", "", 0)
        self._cache: LinkCache[registry_pb2.Descriptor] = (
            cache if cache is not None else LinkCache(0, 0)  # (an empty cache is falsy)
        )
        self._cleanups: set[asyncio.Task[None]] = set()  # aborts in flight (kept referenced)

    def _md(self) -> tuple[tuple[str, str], ...] | None:
        """Metadata of every blobsvc call: the gateway's internal grant, if it has a secret."""
        return self._direct.internal_metadata()

    # --- reading ------------------------------------------------------------------------------

    @servicer_method
    async def StatBlob(
        self, request: registry_pb2.StatBlobRequest, context: Context
    ) -> registry_pb2.Descriptor:
        cached = self._cache.get(request.repository, request.digest)  # only valid keys are kept
        if cached is not None:
            return cached
        repository = validation.repository(request.repository)
        digest = validation.digest(request.digest)
        return await self._resolve(repository, str(digest))

    @servicer_method
    async def ReadBlob(
        self, request: registry_pb2.ReadBlobRequest, context: Context
    ) -> AsyncIterator[bytes]:
        """Yields serialized ReadBlobResponse messages: the descriptor (with the first chunk),
        then blobsvc's chunks re-tagged as they come."""
        validation.read_range(request.offset, request.length)
        blob = await self._resolve_request(request.repository, request.digest)
        if request.offset > blob.size:
            raise out_of_range(
                Reason.RANGE_INVALID,
                f"offset {request.offset} is beyond the end of the blob ({blob.size} bytes)",
                size=blob.size,
            )
        available = blob.size - request.offset
        want = available if request.length == 0 else min(request.length, available)
        head = registry_pb2.ReadBlobResponse(blob=blob).SerializeToString()
        if want == 0:
            yield head
            return

        call = self._backends.read_raw(
            blob_pb2.ReadRequest(digest=blob.digest, offset=request.offset, limit=want),
            metadata=self._md(),
        )
        sent = 0
        try:
            async for raw in call:
                payload = wire.data_payload(raw, _BLOB_READ_DATA)
                if payload is None:  # not a plain data message: parse it
                    data = blob_pb2.ReadResponse.FromString(raw).data
                    sent += len(data)
                    out = wire.data_message(_READ_BLOB_DATA, data)
                else:
                    sent += len(payload)
                    out = wire.retag(raw, _READ_BLOB_DATA) if payload else b""
                if head:
                    out, head = head + out, b""
                if out:
                    yield out
        except grpc.RpcError as err:
            if _code(err) == grpc.StatusCode.NOT_FOUND:  # linked, but gone from the store
                self._cache.invalidate(request.repository, blob.digest)
            raise
        finally:
            metrics.BYTES_OUT.labels("ReadBlob").inc(sent)
        if sent != want:
            # A store that lost bytes must not pass for a short blob.
            raise LinkedBlobError(
                grpc.StatusCode.DATA_LOSS,
                Reason.INTERNAL,
                f"blobsvc sent {sent} of {want} bytes of {blob.digest}",
            )
        if head:
            yield head

    @servicer_method
    async def LocateBlob(
        self, request: registry_pb2.LocateBlobRequest, context: Context
    ) -> registry_pb2.BlobLocation:
        blob = await self._resolve_request(request.repository, request.digest)
        return registry_pb2.BlobLocation(blob=blob, direct=self._direct.read(blob.digest))

    # --- storing in one call --------------------------------------------------------------------

    @servicer_method
    async def PutBlob(
        self, request: registry_pb2.PutBlobRequest, context: Context
    ) -> registry_pb2.Descriptor:
        repository = validation.repository(request.repository)
        media_type = validation.media_type(request.media_type)
        digest = validation.optional_digest(request.digest)
        validation.data_size(len(request.data))
        stored = await self._blob.Put(
            blob_pb2.PutRequest(data=request.data, digest=str(digest) if digest else ""),
            metadata=self._md(),
        )
        metrics.BYTES_IN.labels("PutBlob").inc(stored.blob.size)
        return await self._link_stored(repository, stored.blob, media_type)

    @servicer_method
    async def PushBlob(
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> registry_pb2.Descriptor:
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        header_msg = registry_pb2.PushBlobRequest.FromString(first or b"")
        if not header_msg.HasField("header"):
            raise invalid_argument(
                Reason.BLOB_UPLOAD_INVALID, "the first PushBlob message must be the header"
            )
        header = header_msg.header
        repository = validation.repository(header.repository)
        media_type = validation.media_type(header.media_type)
        digest = validation.optional_digest(header.digest)
        size = validation.expected_size(header.size if header.HasField("size") else None)

        if digest is not None:
            linked = await self._link_if_recorded(repository, digest, size, media_type)
            if linked is not None:
                return linked  # the early return: the data is not read

        # A staging area of its own: nobody else knows the id, nobody can resume it.
        upload_id = f"push-{secrets.token_urlsafe(18)}"
        first_write = blob_pb2.WriteRequest(
            upload_id=upload_id,
            offset=0,
            commit=True,
            commit_digest=str(digest) if digest else "",
            commit_size=size,
            algorithm=digest.algorithm if digest else "",
        )
        try:
            written = await self._relay_write(
                first_write, messages, _PUSH_BLOB_DATA, _push_data, "PushBlob"
            )
        except BaseException:
            self._drop_staging(upload_id)
            raise
        return await self._link_stored(repository, written.blob, media_type)

    # --- resumable uploads ----------------------------------------------------------------------

    @servicer_method
    async def StartUpload(
        self, request: registry_pb2.StartUploadRequest, context: Context
    ) -> registry_pb2.Upload:
        repository = validation.repository(request.repository)
        if request.direct:
            self._direct.require()  # before a session is made
        session = await self._link.CreateSession(
            link_pb2.CreateSessionRequest(repository=repository)
        )
        upload = registry_pb2.Upload(
            id=session.id, repository=session.repository, offset=0, started_at=session.started_at
        )
        if request.direct:
            upload.direct.CopyFrom(self._direct.write(session.id))
        return upload

    @servicer_method
    async def WriteUpload(
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> registry_pb2.Upload:
        messages = aiter(request_iterator)
        first_raw = await anext(messages, None)
        if first_raw is None:
            raise invalid_argument(
                Reason.BLOB_UPLOAD_INVALID, "WriteUpload needs a first message naming the upload"
            )
        first = registry_pb2.WriteUploadRequest.FromString(first_raw)
        repository = validation.repository(first.repository)
        upload_id = validation.upload_id(first.upload_id)
        validation.write_offset(first.offset)
        validation.data_size(len(first.data))
        session = await self._active_session(repository, upload_id)

        first_write = blob_pb2.WriteRequest(
            upload_id=upload_id, offset=first.offset, data=first.data
        )
        written = await self._write_upload(first_write, messages, "WriteUpload")
        await self._advance_session(session, written.size)
        return registry_pb2.Upload(
            id=upload_id, repository=repository, offset=written.size, started_at=session.started_at
        )

    @servicer_method
    async def GetUpload(
        self, request: registry_pb2.GetUploadRequest, context: Context
    ) -> registry_pb2.Upload:
        repository = validation.repository(request.repository)
        upload_id = validation.upload_id(request.upload_id)
        if request.direct:
            self._direct.require()
        session, staged = await self._session_and_staged(repository, upload_id)
        if session.state != _ACTIVE:
            raise _unknown_upload(upload_id)
        upload = registry_pb2.Upload(
            id=upload_id,
            repository=repository,
            offset=staged,
            started_at=session.started_at,
        )
        if request.direct:
            upload.direct.CopyFrom(self._direct.write(upload_id))
        return upload

    @servicer_method
    async def CommitUpload(
        self, request: registry_pb2.CommitUploadRequest, context: Context
    ) -> registry_pb2.Descriptor:
        repository = validation.repository(request.repository)
        upload_id = validation.upload_id(request.upload_id)
        digest = validation.digest(request.digest)
        media_type = validation.media_type(request.media_type)
        validation.data_size(len(request.data))
        validation.write_offset(request.offset)

        if request.data:
            session, staged = await self._session(repository, upload_id), 0
        else:
            session, staged = await self._session_and_staged(repository, upload_id)
        if session.state == _COMMITTED:
            # A retried commit (its answer was lost): answer from the link it made.
            try:
                return await self._resolve(repository, str(digest))
            except grpc.RpcError as err:
                if _code(err) == grpc.StatusCode.NOT_FOUND:
                    raise _unknown_upload(upload_id) from None
                raise
        if session.state != _ACTIVE:
            raise _unknown_upload(upload_id)
        if staged > session.size:
            # Bytes written to blobsvc directly: recorded in the session before the commit
            # moves them, so that a commit retried after the staged bytes became a blob (and
            # before the link was made) is finished from the size the session recorded.
            await self._advance_session(session, staged)
            session.size = staged

        stored = await self._commit_staged(session, digest, request.data, request.offset)
        generation = self._cache.generation
        linked = await self._link.Link(
            link_pb2.LinkRequest(
                repository=repository,
                digest=stored.digest,
                media_type=media_type,
                size=stored.size,
                finish_session_id=upload_id,
            )
        )
        return self._linked(repository, linked.blob, generation)

    @servicer_method
    async def CancelUpload(
        self, request: registry_pb2.CancelUploadRequest, context: Context
    ) -> empty_pb2.Empty:
        repository = validation.repository(request.repository)
        upload_id = validation.upload_id(request.upload_id)
        await self._active_session(repository, upload_id)
        # The session first: once cancelled, no write or commit is accepted for it.
        await self._link.FinishSession(
            link_pb2.FinishSessionRequest(id=upload_id, state=link_pb2.Session.CANCELLED)
        )
        await self._blob.Abort(blob_pb2.AbortRequest(upload_id=upload_id), metadata=self._md())
        return empty_pb2.Empty()

    # --- links ----------------------------------------------------------------------------------

    @servicer_method
    async def MountBlob(
        self, request: registry_pb2.MountBlobRequest, context: Context
    ) -> registry_pb2.Descriptor:
        repository = validation.repository(request.repository)
        source = (
            validation.repository(request.from_repository, "from_repository")
            if request.from_repository
            else ""
        )
        digest = validation.digest(request.digest)
        media_type = validation.media_type(request.media_type)
        # Already linked here, from a source that links it (as far as this gateway saw within
        # the cache's TTL): nothing to change, no call to make.
        linked = self._cache.get(repository, request.digest)
        if (
            linked is not None
            and media_type in ("", linked.media_type)
            and (not source or self._cache.get(source, request.digest) is not None)
        ):
            return linked
        # With no source, any repository that links the blob will do. This is where
        # authorization will restrict the candidates to the repositories the caller may read.
        generation = self._cache.generation
        mounted = await self._link.Mount(
            link_pb2.MountRequest(
                repository=repository,
                from_repository=source,
                digest=str(digest),
                media_type=media_type,
            )
        )
        return self._linked(repository, mounted.blob, generation)

    @servicer_method
    async def DeleteBlob(
        self, request: registry_pb2.DeleteBlobRequest, context: Context
    ) -> empty_pb2.Empty:
        if not self._enable_delete:
            raise failed_precondition(
                Reason.UNSUPPORTED, "deletes are disabled on this gateway (--enable-delete)"
            )
        repository = validation.repository(request.repository)
        digest = validation.digest(request.digest)
        try:
            await self._link.Unlink(
                link_pb2.UnlinkRequest(repository=repository, digest=str(digest))
            )
        finally:
            # After the unlink (and whatever its outcome): an answer fetched before it is not
            # cached any more (see LinkCache.put).
            self._cache.invalidate(repository, str(digest))
        return empty_pb2.Empty()

    @servicer_method
    async def ListBlobs(
        self, request: registry_pb2.ListBlobsRequest, context: Context
    ) -> registry_pb2.ListBlobsResponse:
        repository = validation.repository(request.repository)
        validation.page(request.page_size, request.page_token)
        links = await self._link.ListLinks(
            link_pb2.ListLinksRequest(
                repository=repository, page_size=request.page_size, page_token=request.page_token
            )
        )
        return registry_pb2.ListBlobsResponse(
            blobs=[_descriptor(b) for b in links.blobs], next_page_token=links.next_page_token
        )

    @servicer_method
    async def ListRepositories(
        self, request: registry_pb2.ListRepositoriesRequest, context: Context
    ) -> registry_pb2.ListRepositoriesResponse:
        validation.page(request.page_size, request.page_token)
        names = await self._link.ListRepositories(
            link_pb2.ListRepositoriesRequest(
                page_size=request.page_size, page_token=request.page_token
            )
        )
        return registry_pb2.ListRepositoriesResponse(
            repositories=list(names.repositories), next_page_token=names.next_page_token
        )

    # --- steps ----------------------------------------------------------------------------------

    async def _resolve_request(self, repository: str, digest: str) -> registry_pb2.Descriptor:
        """The descriptor through a request's link: from the cache (a hit means the strings
        were validated before), else validated and resolved."""
        cached = self._cache.get(repository, digest)
        if cached is not None:
            return cached
        validation.repository(repository)
        validation.digest(digest)
        return await self._resolve(repository, digest)

    async def _resolve(self, repository: str, digest: str) -> registry_pb2.Descriptor:
        """Resolves a validated (repository, digest) through linksvc, and caches the answer."""
        generation = self._cache.generation
        resolved = await self._link.Resolve(
            link_pb2.ResolveRequest(repository=repository, digest=digest)
        )
        return self._linked(repository, resolved.blob, generation)

    def _linked(
        self, repository: str, blob: link_pb2.Descriptor, generation: int
    ) -> registry_pb2.Descriptor:
        """The public descriptor of a link linksvc just confirmed, cached for later reads."""
        desc = _descriptor(blob)
        self._cache.put(repository, desc.digest, desc, generation)
        return desc

    async def _link_stored(
        self, repository: str, blob: blob_pb2.Descriptor, media_type: str
    ) -> registry_pb2.Descriptor:
        """Records (with its size) and links a blob blobsvc holds, in one linksvc transaction."""
        generation = self._cache.generation
        linked = await self._link.Link(
            link_pb2.LinkRequest(
                repository=repository, digest=blob.digest, media_type=media_type, size=blob.size
            )
        )
        return self._linked(repository, linked.blob, generation)

    async def _link_if_recorded(
        self, repository: str, digest: Digest, size: int | None, media_type: str
    ) -> registry_pb2.Descriptor | None:
        """Links a blob linksvc has recorded (bytes already durable); None when it has not."""
        try:
            recorded = await self._link.StatBlob(link_pb2.StatBlobRequest(digest=str(digest)))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                return None
            raise
        if size is not None and size != recorded.size:
            raise invalid_argument(
                Reason.SIZE_INVALID,
                f"{digest} is {recorded.size} bytes, not the declared {size}",
                size=recorded.size,
            )
        generation = self._cache.generation
        try:
            linked = await self._link.Link(
                link_pb2.LinkRequest(
                    repository=repository, digest=str(digest), media_type=media_type
                )
            )
        except grpc.RpcError as err:
            # Collected between the two calls: upload it after all.
            if _code(err) == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return self._linked(repository, linked.blob, generation)

    async def _session(self, repository: str, upload_id: str) -> link_pb2.Session:
        """The session, if it belongs to ``repository`` (otherwise it is unknown here)."""
        session = await self._link.GetSession(link_pb2.GetSessionRequest(id=upload_id))
        if session.repository != repository:
            raise _unknown_upload(upload_id)
        return session

    async def _active_session(self, repository: str, upload_id: str) -> link_pb2.Session:
        session = await self._session(repository, upload_id)
        if session.state != _ACTIVE:
            raise _unknown_upload(upload_id)
        return session

    async def _staged_size(self, upload_id: str) -> int:
        """The bytes blobsvc holds for an upload; 0 for one never written."""
        try:
            status = await self._blob.UploadStatus(
                blob_pb2.UploadStatusRequest(upload_id=upload_id), metadata=self._md()
            )
        except grpc.RpcError as err:
            if _reason(err) == Reason.BLOB_UPLOAD_UNKNOWN:
                return 0
            raise
        return status.size

    async def _session_and_staged(
        self, repository: str, upload_id: str
    ) -> tuple[link_pb2.Session, int]:
        """Both at once: the session (ownership, state) and the staged size (the truth)."""
        session, staged = await asyncio.gather(
            self._session(repository, upload_id),
            self._staged_size(upload_id),
            return_exceptions=True,
        )
        if isinstance(session, BaseException):
            raise session
        if isinstance(staged, BaseException):
            raise staged
        return session, staged

    async def _advance_session(self, session: link_pb2.Session, size: int) -> None:
        """Moves the session's recorded size up to ``size`` (a compare-and-set in linksvc).

        blobsvc's staged size is the truth; this keeps the session's bookkeeping (and its
        last-update time, which stale-upload purging reads) in step with it. Losing the race
        to a concurrent writer retries from the size that writer set.
        """
        current = session.size
        for _ in range(_ADVANCE_ATTEMPTS):
            if size <= current:
                return
            try:
                await self._link.AdvanceSession(
                    link_pb2.AdvanceSessionRequest(id=session.id, from_size=current, to_size=size)
                )
                return
            except grpc.RpcError as err:
                info = error_info(err)
                if (
                    err.code() != grpc.StatusCode.ABORTED  # type: ignore[attr-defined]
                    or info is None
                    or "size" not in info.metadata
                ):
                    raise
                current = int(info.metadata["size"])
        # Still racing: the bytes are staged all the same; the next write catches up.

    async def _commit_staged(
        self, session: link_pb2.Session, digest: Digest, data: bytes, offset: int
    ) -> blob_pb2.Descriptor:
        """Commits an upload's staged bytes (with an optional last chunk) in blobsvc."""
        if data:
            written = await self._write_upload(
                blob_pb2.WriteRequest(
                    upload_id=session.id,
                    offset=offset,
                    data=data,
                    commit=True,
                    commit_digest=str(digest),
                ),
                None,
                "CommitUpload",
            )
            return written.blob
        try:
            committed = await self._blob.Commit(
                blob_pb2.CommitRequest(upload_id=session.id, digest=str(digest)),
                metadata=self._md(),
            )
            return committed.blob
        except grpc.RpcError as err:
            if _reason(err) != Reason.BLOB_UPLOAD_UNKNOWN:
                raise
            missing = err
        if session.size == 0:
            # Never written: an empty upload. Committing an empty staging area verifies the
            # digest (only the empty blob's passes).
            written = await self._relay_write(
                blob_pb2.WriteRequest(
                    upload_id=session.id,
                    offset=0,
                    commit=True,
                    commit_digest=str(digest),
                    algorithm=digest.algorithm,
                ),
                None,
                _WRITE_UPLOAD_DATA,
                _write_upload_data,
                "CommitUpload",
            )
            return written.blob
        # The staged bytes are gone while the session is active: an earlier commit moved them
        # into the store and stopped before linking. Finish that job when the store holds the
        # digest at exactly the size this session wrote; otherwise the upload is unknown.
        try:
            stat = await self._blob.Stat(
                blob_pb2.StatRequest(digest=str(digest)), metadata=self._md()
            )
        except grpc.RpcError:
            raise from_rpc_error(missing) from None
        if stat.blob.size != session.size:
            raise from_rpc_error(missing)
        return stat.blob

    async def _write_upload(
        self,
        first: blob_pb2.WriteRequest,
        messages: AsyncIterator[bytes] | None,
        method: str,
    ) -> blob_pb2.WriteResponse:
        """Appends to an active session's staging area at ``first.offset``.

        blobsvc checks the offset against the staged bytes (OUT_OF_RANGE with "size"). A
        session never written has no staging area in blobsvc, which refuses a write past 0 as
        an unknown upload; for the Registry such an upload is at offset 0 (as GetUpload says),
        so that is the same wrong-offset answer.
        """
        try:
            return await self._relay_write(
                first, messages, _WRITE_UPLOAD_DATA, _write_upload_data, method
            )
        except LinkedBlobError as err:
            if first.offset > 0 and err.reason == Reason.BLOB_UPLOAD_UNKNOWN:
                raise out_of_range(
                    Reason.BLOB_UPLOAD_INVALID,
                    f"upload {first.upload_id} has 0 bytes; cannot write at {first.offset}",
                    size=0,
                ) from None
            raise

    async def _relay_write(
        self,
        first: blob_pb2.WriteRequest,
        messages: AsyncIterator[bytes] | None,
        data_field: int,
        slow_data: Callable[[bytes], bytes],
        method: str,
    ) -> blob_pb2.WriteResponse:
        """Streams ``first`` and then the caller's data messages into blobsvc Write.

        Data messages are re-tagged, not parsed; at most the messages in flight are held (gRPC
        flow control paces the caller to blobsvc). A failure of blobsvc mid-stream (a wrong
        offset, a digest mismatch at commit) is raised with its code and reason.
        """
        call = WriteCall(self._backends.write_raw(metadata=self._md()))  # type: ignore[call-arg]
        received = len(first.data)
        try:
            await call.send(first.SerializeToString())
            if messages is not None:
                async for raw in messages:
                    payload = wire.data_payload(raw, data_field)
                    if payload is None:
                        data = slow_data(raw)
                        validation.data_size(len(data))
                        out = wire.data_message(_BLOB_WRITE_DATA, data)
                        received += len(data)
                    else:
                        validation.data_size(len(payload))
                        out = wire.retag(raw, _BLOB_WRITE_DATA) if payload else b""
                        received += len(payload)
                    if out:
                        await call.send(out)
            response: blob_pb2.WriteResponse = await call.finish()
            return response
        except BaseException:
            call.cancel()
            raise
        finally:
            metrics.BYTES_IN.labels(method).inc(received)

    def _drop_staging(self, upload_id: str) -> None:
        """Drops the staging area of a PushBlob that failed (nobody can resume it).

        In tasks of their own, so that a handler being cancelled (its caller went away) cannot
        stop them. A blobsvc Write this gateway cancelled may still be settling (and re-create
        the staging area with the bytes it received) when the first Abort arrives, so a second
        one follows once it has settled. Best effort: a crash in between leaves the staged
        bytes to blobsvc's purge of stale uploads.
        """
        loop = asyncio.get_running_loop()
        for after in (0.0, _ABORT_AGAIN_AFTER):
            task = loop.create_task(self._abort_quietly(upload_id, after))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    async def _abort_quietly(self, upload_id: str, after: float = 0) -> None:
        if after:
            await asyncio.sleep(after)
        with contextlib.suppress(grpc.RpcError, grpc.aio.UsageError):
            await self._blob.Abort(blob_pb2.AbortRequest(upload_id=upload_id), metadata=self._md())
