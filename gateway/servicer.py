"""linkedblob.v1.Registry: the public API over the gateway's domain (gateway.registry,
gateway.uploads).

Each method authenticates its caller (gateway.auth.access: before it reads a byte of a stream),
validates its request (gateway.validation), requires the caller's right to the action on the
repository it names, calls the domain, and maps its values to messages; @servicer_method turns
a LinkedBlobError into the call's status. The domain is told which repositories a restricted
caller may pull where an answer could otherwise reveal a blob it may not see (a PushBlob of a
declared digest, a MountBlob without a source, the catalog). Direct access
(gateway.direct): with a grant secret, LocateBlob and direct uploads hand the client blobsvc's
address and a grant for one digest or one upload, after the domain's checks.

The byte streams (ReadBlob, PushBlob, WriteUpload) take and give serialized messages (see
gateway.server); their data messages are relayed without parsing (gateway.model.IncomingData,
OutgoingData), and counted (metrics.BYTES_IN, BYTES_OUT) by the backend adapter that relays
them; the servicer only sets the limit of a data message (IncomingData.check_size).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from gateway import validation
from gateway.auth.access import Access, Action, Caller
from gateway.direct import GrantIssuer
from gateway.model import IncomingData, LinkedBlob, OutgoingData, UploadSession
from gateway.registry import MayPull, Registry
from gateway.uploads import Uploads
from linkedblob import transport
from linkedblob.errors import Reason, invalid_argument
from linkedblob.rpc import note, servicer_method
from linkedblob.v1 import registry_pb2

Context = grpc.aio.ServicerContext


def _descriptor(blob: LinkedBlob) -> registry_pb2.Descriptor:
    return registry_pb2.Descriptor(digest=blob.digest, size=blob.size, media_type=blob.media_type)


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _upload(session: UploadSession, offset: int) -> registry_pb2.Upload:
    return registry_pb2.Upload(
        id=session.id,
        repository=session.repository,
        offset=offset,
        started_at=_timestamp(session.started_at_ns),
    )


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


def _may_pull(caller: Caller) -> MayPull:
    """What the domain is told of the repositories ``caller`` may pull (None: all)."""
    return None if caller.pulls_everything() else caller.may_pull


class RegistryServicer:
    def __init__(
        self,
        registry: Registry,
        uploads: Uploads,
        grants: GrantIssuer,
        access: Access | None = None,
    ) -> None:
        """``access``: who may do what (None: an open gateway, everyone everything)."""
        self._registry = registry
        self._uploads = uploads
        self._grants = grants
        self._access = access if access is not None else Access()

    # --- reading --------------------------------------------------------------------------------

    @servicer_method
    async def StatBlob(
        self, request: registry_pb2.StatBlobRequest, context: Context
    ) -> registry_pb2.Descriptor:
        caller = self._access.authenticate(context)
        return _descriptor(await self._resolve(caller, request.repository, request.digest))

    @servicer_method
    async def ReadBlob(
        self, request: registry_pb2.ReadBlobRequest, context: Context
    ) -> AsyncIterator[bytes]:
        """Yields serialized ReadBlobResponse messages: the descriptor (with the first chunk),
        then blobsvc's chunks re-tagged as they come."""
        caller = self._access.authenticate(context)
        validation.read_range(request.offset, request.length)
        blob = await self._resolve(caller, request.repository, request.digest)
        head = registry_pb2.ReadBlobResponse(blob=_descriptor(blob)).SerializeToString()
        out = OutgoingData(transport.READ_BLOB_DATA, head, "ReadBlob")
        chunks = await self._registry.read(
            request.repository, blob, request.offset, request.length, out
        )
        if chunks is None:
            yield head
            return
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    @servicer_method
    async def LocateBlob(
        self, request: registry_pb2.LocateBlobRequest, context: Context
    ) -> registry_pb2.BlobLocation:
        caller = self._access.authenticate(context)
        blob = await self._resolve(caller, request.repository, request.digest)
        return registry_pb2.BlobLocation(
            blob=_descriptor(blob), direct=self._grants.read(blob.digest)
        )

    async def _resolve(self, caller: Caller, repository: str, digest: str) -> LinkedBlob:
        validation.repository(repository)
        parsed = validation.digest(digest)
        self._access.require(caller, Action.PULL, repository)
        return await self._registry.stat(repository, str(parsed))

    # --- storing in one call --------------------------------------------------------------------

    @servicer_method
    async def PutBlob(
        self, request: registry_pb2.PutBlobRequest, context: Context
    ) -> registry_pb2.Descriptor:
        caller = self._access.authenticate(context)
        repository = validation.repository(request.repository)
        media_type = validation.media_type(request.media_type)
        digest = validation.optional_digest(request.digest)
        validation.data_size(len(request.data))
        self._access.require(caller, Action.PUSH, repository)
        blob = await self._registry.put(repository, media_type, digest, request.data)
        return _descriptor(blob)

    @servicer_method
    async def PushBlob(
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> registry_pb2.Descriptor:
        caller = self._access.authenticate(context)  # before a byte is read
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
        note(repository, str(digest) if digest else "")  # for the access line
        self._access.require(caller, Action.PUSH, repository)
        data = IncomingData(
            messages, transport.PUSH_BLOB_DATA, _push_data, "PushBlob", validation.data_size
        )
        blob = await self._registry.push(
            repository, media_type, digest, size, data, _may_pull(caller)
        )
        return _descriptor(blob)

    # --- resumable uploads ----------------------------------------------------------------------

    @servicer_method
    async def StartUpload(
        self, request: registry_pb2.StartUploadRequest, context: Context
    ) -> registry_pb2.Upload:
        caller = self._access.authenticate(context)
        repository = validation.repository(request.repository)
        self._access.require(caller, Action.PUSH, repository)
        if request.direct:
            self._grants.require()  # before a session is made
        session = await self._uploads.start(repository)
        upload = _upload(session, 0)
        if request.direct:
            await self._uploads.prepare_direct(session)
            upload.direct.CopyFrom(self._grants.write(session.id))
        return upload

    @servicer_method
    async def WriteUpload(
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> registry_pb2.Upload:
        caller = self._access.authenticate(context)  # before a byte is read
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
        note(repository)  # for the access line
        self._access.require(caller, Action.PUSH, repository)
        rest = IncomingData(
            messages,
            transport.WRITE_UPLOAD_DATA,
            _write_upload_data,
            "WriteUpload",
            validation.data_size,
        )
        session, size = await self._uploads.write(
            repository, upload_id, first.offset, first.data, rest
        )
        return _upload(session, size)

    @servicer_method
    async def GetUpload(
        self, request: registry_pb2.GetUploadRequest, context: Context
    ) -> registry_pb2.Upload:
        caller = self._access.authenticate(context)
        repository = validation.repository(request.repository)
        upload_id = validation.upload_id(request.upload_id)
        self._access.require(caller, Action.PUSH, repository)
        if request.direct:
            self._grants.require()
        session, staged = await self._uploads.status(repository, upload_id)
        upload = _upload(session, staged)
        if request.direct:
            await self._uploads.prepare_direct(session, staged)
            upload.direct.CopyFrom(self._grants.write(upload_id))
        return upload

    @servicer_method
    async def CommitUpload(
        self, request: registry_pb2.CommitUploadRequest, context: Context
    ) -> registry_pb2.Descriptor:
        caller = self._access.authenticate(context)
        repository = validation.repository(request.repository)
        upload_id = validation.upload_id(request.upload_id)
        digest = validation.digest(request.digest)
        media_type = validation.media_type(request.media_type)
        validation.data_size(len(request.data))
        validation.write_offset(request.offset)
        self._access.require(caller, Action.PUSH, repository)
        blob = await self._uploads.commit(
            repository, upload_id, digest, media_type, request.data, request.offset
        )
        return _descriptor(blob)

    @servicer_method
    async def CancelUpload(
        self, request: registry_pb2.CancelUploadRequest, context: Context
    ) -> empty_pb2.Empty:
        caller = self._access.authenticate(context)
        repository = validation.repository(request.repository)
        upload_id = validation.upload_id(request.upload_id)
        self._access.require(caller, Action.PUSH, repository)
        await self._uploads.cancel(repository, upload_id)
        return empty_pb2.Empty()

    @servicer_method
    async def ListUploads(
        self, request: registry_pb2.ListUploadsRequest, context: Context
    ) -> registry_pb2.ListUploadsResponse:
        caller = self._access.authenticate(context)
        repository = validation.repository(request.repository)
        validation.page(request.page_size, request.page_token)
        self._access.require(caller, Action.PUSH, repository)
        page = await self._uploads.in_progress(repository, request.page_size, request.page_token)
        uploads = []
        for session in page.items:
            upload = _upload(session, session.size)
            upload.updated_at.CopyFrom(_timestamp(session.updated_at_ns))
            uploads.append(upload)
        return registry_pb2.ListUploadsResponse(
            uploads=uploads, next_page_token=page.next_page_token
        )

    # --- links ----------------------------------------------------------------------------------

    @servicer_method
    async def MountBlob(
        self, request: registry_pb2.MountBlobRequest, context: Context
    ) -> registry_pb2.Descriptor:
        caller = self._access.authenticate(context)
        repository = validation.repository(request.repository)
        source = (
            validation.repository(request.from_repository, "from_repository")
            if request.from_repository
            else ""
        )
        digest = validation.digest(request.digest)
        media_type = validation.media_type(request.media_type)
        self._access.require(caller, Action.PUSH, repository)
        if source:
            self._access.require(caller, Action.PULL, source)
        blob = await self._registry.mount(repository, source, digest, media_type, _may_pull(caller))
        return _descriptor(blob)

    @servicer_method
    async def DeleteBlob(
        self, request: registry_pb2.DeleteBlobRequest, context: Context
    ) -> empty_pb2.Empty:
        caller = self._access.authenticate(context)
        self._registry.check_delete_enabled()
        repository = validation.repository(request.repository)
        digest = validation.digest(request.digest)
        self._access.require(caller, Action.DELETE, repository)
        await self._registry.delete(repository, digest)
        return empty_pb2.Empty()

    @servicer_method
    async def ListBlobs(
        self, request: registry_pb2.ListBlobsRequest, context: Context
    ) -> registry_pb2.ListBlobsResponse:
        caller = self._access.authenticate(context)
        repository = validation.repository(request.repository)
        validation.page(request.page_size, request.page_token)
        self._access.require(caller, Action.PULL, repository)
        page = await self._registry.list_blobs(repository, request.page_size, request.page_token)
        return registry_pb2.ListBlobsResponse(
            blobs=[_descriptor(blob) for blob in page.items],
            next_page_token=page.next_page_token,
        )

    @servicer_method
    async def ListRepositories(
        self, request: registry_pb2.ListRepositoriesRequest, context: Context
    ) -> registry_pb2.ListRepositoriesResponse:
        caller = self._access.authenticate(context)
        validation.page(request.page_size, request.page_token)
        self._access.require_some_grant(caller)
        page = await self._registry.list_repositories(
            request.page_size, request.page_token, None if caller.catalog() else caller.may_pull
        )
        return registry_pb2.ListRepositoriesResponse(
            repositories=page.items, next_page_token=page.next_page_token
        )
