"""The gRPC surface of blobsvc (linkedblob.blob.v1.BlobService): validates each request at the
edge, calls the domain (blobsvc.store), maps the results. Errors become statuses in
linkedblob.rpc.servicer_method.

Grants: given a Signer (``--grant-secret``), every call must carry a grant (linkedblob.grants) that
allows it, checked before the request touches storage: "read" of a digest for Stat/Read of it,
"write" of an upload id for Write/UploadStatus of it, "internal" for everything (and the only one
for Commit, Abort, Put, Delete, List, ListUploads and FindMissing). The token is verified when the
call starts (UNAUTHENTICATED / UNAUTHORIZED), its scope once the request names its subject
(PERMISSION_DENIED / DENIED); for Write, after the first message and before any byte is written.
A write grant is bound to state: its Write only appends to a staging area that exists (the
gateway creates it when it issues the grant), so after a commit or cancel it is NOT_FOUND and
creates nothing; and its expiry is checked on every message (UNAUTHENTICATED / UNAUTHORIZED
"grant expired" ends the stream, the bytes before it stay staged).

Limits (blobsvc.limits): a Write stream idle for ``idle_stream_timeout`` seconds is ended with
RESOURCE_EXHAUSTED / STREAM_IDLE; at most ``max_open_uploads`` Write streams run at once, the
next answered RESOURCE_EXHAUSTED / TOO_MANY_REQUESTS (limit=max-open-uploads).

The byte streams skip protobuf for their data messages (see linkedblob.wire and
blobsvc.server.method_handlers): Write receives raw serialized WriteRequests and takes a
zero-copy view of each data-only message's payload; Read sends ReadResponses it serializes
itself. That saves two or three copies of every MiB on the hot path.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from blobsvc.limits import StreamLimits
from blobsvc.storage import UploadInfo, validate_upload_id
from blobsvc.store import MAX_FIND_MISSING, BlobStore, CommitSpec, Committed
from linkedblob import metrics, wire
from linkedblob.blob.v1 import blob_pb2 as pb
from linkedblob.config import MAX_CHUNK_BYTES
from linkedblob.digests import Digest, parse_algorithm
from linkedblob.errors import (
    LinkedBlobError,
    Reason,
    invalid_argument,
    resource_exhausted,
)
from linkedblob.grants import INTERNAL, READ, WRITE, Grant, Signer, expired_error, token_from
from linkedblob.rpc import malformed_request, servicer_method
from linkedblob.transport import BLOB_READ, BLOB_READ_DATA, BLOB_WRITE, BLOB_WRITE_DATA

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BlobService"].full_name

_bytes_in_write = metrics.BYTES_IN.labels("Write")
_bytes_in_put = metrics.BYTES_IN.labels("Put")
_bytes_out_read = metrics.BYTES_OUT.labels("Read")

_Data = TypeVar("_Data", bound=bytes | memoryview)


def _method_name(path: str) -> str:
    """``Method`` of ``/package.Service/Method``."""
    return path.rsplit("/", 1)[1]


# Methods whose requests reach the servicer unparsed / whose responses leave it serialized.
RAW_REQUESTS = frozenset({_method_name(BLOB_WRITE)})
RAW_RESPONSES = frozenset({_method_name(BLOB_READ)})


def _check_chunk(data: _Data) -> _Data:
    if len(data) > MAX_CHUNK_BYTES:
        raise resource_exhausted(
            Reason.SIZE_INVALID,
            f"data message of {len(data)} bytes exceeds the limit of {MAX_CHUNK_BYTES}",
            limit=MAX_CHUNK_BYTES,
        )
    return data


def _stored(committed: Committed) -> dict[str, Any]:
    """The fields of a response that says what was stored: the blob, and whether it was
    already there."""
    blob = pb.Descriptor(digest=str(committed.digest), size=committed.size)
    return {"blob": blob, "already_existed": committed.already_existed}


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(round(seconds * 1e9))
    return ts


def _staged(info: UploadInfo) -> pb.StagedUpload:
    return pb.StagedUpload(
        upload_id=info.upload_id, size=info.size, updated_at=_timestamp(info.updated_at)
    )


def _optional_digest(text: str) -> Digest | None:
    return Digest.parse(text) if text else None


def _parse_write_request(raw: bytes) -> pb.WriteRequest:
    try:
        return pb.WriteRequest.FromString(raw)
    except DecodeError:
        raise malformed_request("Write") from None


async def _write_data(
    first: pb.WriteRequest, rest: AsyncIterator[bytes], grant: Grant | None
) -> AsyncIterator[bytes | memoryview]:
    """The data of a Write stream's messages, each checked against the size limit (before it
    is written): a view into the raw message when it holds only data (the usual case). A
    client's write grant is checked on every message (its expiry: cheap)."""
    expires = grant.expires if grant is not None and grant.action != INTERNAL else None
    data: bytes | memoryview = _check_chunk(first.data)
    _bytes_in_write.inc(len(data))
    yield data
    async for raw in rest:
        if expires is not None and expires < time.time():
            raise expired_error()
        view = wire.data_payload(raw, BLOB_WRITE_DATA)
        data = _check_chunk(view if view is not None else _parse_write_request(raw).data)
        _bytes_in_write.inc(len(data))
        yield data


def _require(grant: Grant | None, action: str, subject: str = "") -> None:
    """PERMISSION_DENIED / DENIED unless the grant (None: none are required) allows it."""
    if grant is not None and not grant.allows(action, subject):
        what = f"{action} of {subject[:200]!r}" if subject else "this call"
        raise LinkedBlobError(
            grpc.StatusCode.PERMISSION_DENIED,
            Reason.DENIED,
            f"the grant ({grant.action}) does not allow {what}",
        )


class BlobServicer:
    """Implements every method of BlobService (registered by blobsvc.server.method_handlers)."""

    def __init__(
        self, store: BlobStore, signer: Signer | None = None, limits: StreamLimits | None = None
    ) -> None:
        self.store = store
        self.signer = signer  # None: no grants required
        self.limits = limits or StreamLimits()

    def _grant(self, context: grpc.aio.ServicerContext) -> Grant | None:
        """The call's verified grant (None when grants are not required)."""
        if self.signer is None:
            return None
        return self.signer.verify(token_from(context))

    def _allow(self, context: grpc.aio.ServicerContext, action: str, subject: str = "") -> None:
        _require(self._grant(context), action, subject)

    @servicer_method
    async def Stat(
        self, request: pb.StatRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatResponse:
        self._allow(context, READ, request.digest)
        digest = Digest.parse(request.digest)
        size = await self.store.stat(digest)
        return pb.StatResponse(blob=pb.Descriptor(digest=str(digest), size=size))

    @servicer_method
    async def FindMissing(
        self, request: pb.FindMissingRequest, context: grpc.aio.ServicerContext
    ) -> pb.FindMissingResponse:
        self._allow(context, INTERNAL)
        if len(request.digests) > MAX_FIND_MISSING:  # before parsing a huge list
            raise invalid_argument(
                Reason.PAGINATION_INVALID,
                f"at most {MAX_FIND_MISSING} digests per call, got {len(request.digests)}",
            )
        digests = [Digest.parse(d) for d in request.digests]
        missing = await self.store.find_missing(digests)
        return pb.FindMissingResponse(missing=[str(d) for d in missing])

    @servicer_method
    async def Read(
        self, request: pb.ReadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Yields serialized ReadResponses (RAW_RESPONSES)."""
        self._allow(context, READ, request.digest)
        digest = Digest.parse(request.digest)
        async for chunk in self.store.read(digest, request.offset, request.limit):
            _bytes_out_read.inc(len(chunk))
            yield wire.data_message(BLOB_READ_DATA, chunk)

    @servicer_method
    async def Write(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.WriteResponse:
        """Takes serialized WriteRequests (RAW_REQUESTS)."""
        grant = self._grant(context)
        with self.limits.open_upload():
            return await self._write(grant, self.limits.idle(aiter(request_iterator)))

    async def _write(self, grant: Grant | None, messages: AsyncIterator[bytes]) -> pb.WriteResponse:
        first_raw = await anext(messages, None)
        if first_raw is None:
            raise invalid_argument(
                Reason.BLOB_UPLOAD_INVALID, "empty stream: the first message names the upload"
            )
        first = _parse_write_request(first_raw)
        _require(grant, WRITE, first.upload_id)
        if first.commit:
            # Committing stores a blob under a digest: the gateway's call (CommitUpload), which
            # then records and links it. A client's write grant only stages bytes.
            _require(grant, INTERNAL)
        upload_id = validate_upload_id(first.upload_id)
        algorithm = parse_algorithm(first.algorithm)
        commit = None
        if first.commit:
            size = first.commit_size if first.HasField("commit_size") else None
            commit = CommitSpec(_optional_digest(first.commit_digest), size)
        result = await self.store.write(
            upload_id,
            first.offset,
            algorithm,
            _write_data(first, messages, grant),
            commit,
            staged_digest=first.want_staged_digest,
            # A client's write grant appends to the staging area the gateway made, never
            # creates one (so it cannot outlive a commit or cancel).
            create=grant is None or grant.action == INTERNAL,
        )
        if result.committed is None:
            staged = str(result.staged_digest) if result.staged_digest else ""
            return pb.WriteResponse(size=result.size, staged_digest=staged)
        return pb.WriteResponse(size=result.size, **_stored(result.committed))

    @servicer_method
    async def UploadStatus(
        self, request: pb.UploadStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.UploadStatusResponse:
        self._allow(context, WRITE, request.upload_id)
        info = await self.store.upload_info(validate_upload_id(request.upload_id))
        return pb.UploadStatusResponse(size=info.size, updated_at=_timestamp(info.updated_at))

    @servicer_method
    async def Commit(
        self, request: pb.CommitRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommitResponse:
        self._allow(context, INTERNAL)
        upload_id = validate_upload_id(request.upload_id)
        size = request.size if request.HasField("size") else None
        spec = CommitSpec(_optional_digest(request.digest), size)
        return pb.CommitResponse(**_stored(await self.store.commit(upload_id, spec)))

    @servicer_method
    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        self._allow(context, INTERNAL)
        await self.store.abort(validate_upload_id(request.upload_id))
        return pb.AbortResponse()

    @servicer_method
    async def Put(
        self, request: pb.PutRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutResponse:
        self._allow(context, INTERNAL)
        data = _check_chunk(request.data)
        expected = _optional_digest(request.digest)
        _bytes_in_put.inc(len(data))
        return pb.PutResponse(**_stored(await self.store.put(data, expected)))

    @servicer_method
    async def Delete(
        self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteResponse:
        self._allow(context, INTERNAL)
        deleted = await self.store.delete(Digest.parse(request.digest))
        return pb.DeleteResponse(deleted=deleted)

    @servicer_method
    async def List(
        self, request: pb.ListRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListResponse:
        self._allow(context, INTERNAL)
        page, next_token = await self.store.list(request.page_size, request.page_token)
        return pb.ListResponse(
            blobs=[pb.Descriptor(digest=str(d), size=size) for d, size in page],
            next_page_token=next_token,
        )

    @servicer_method
    async def ListUploads(
        self, request: pb.ListUploadsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListUploadsResponse:
        self._allow(context, INTERNAL)
        page, next_token = await self.store.list_uploads(request.page_size, request.page_token)
        return pb.ListUploadsResponse(
            uploads=[_staged(info) for info in page], next_page_token=next_token
        )
