"""The BlobBackend over gRPC: blobsvc, on one aio channel reused by every call.

A failed call becomes a LinkedBlobError here, once (gateway.grpc_calls: blobsvc's code and
reason kept; a transport failure, or a call on the channel once it is closed, UNAVAILABLE).
The bytes relayed are counted here too (metrics.BYTES_IN, BYTES_OUT: by the public method they
came in or go out by), since this is where they pass. The two byte streams (Read, Write) are
opened by their method paths with raw-bytes (de)serializers, and their data messages
re-tagged, not parsed, between the caller's field and blobsvc's (linkedblob.wire): one copy
per message, the re-tag.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any

import grpc

from gateway.grpc_calls import (
    CHANNEL_FAILURES,
    FINAL_STATUS_WAIT,
    WriteCall,
    answer,
    channel_failure,
)
from gateway.model import BlobDescriptor, CommitSpec, IncomingData, OutgoingData, Written
from linkedblob import interceptors, metrics, tls, transport, wire
from linkedblob.blob.v1 import blob_pb2, blob_pb2_grpc
from linkedblob.errors import LinkedBlobError, Reason, from_rpc_error

Metadata = tuple[tuple[str, str], ...]

_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


def _blob(descriptor: blob_pb2.Descriptor) -> BlobDescriptor:
    return BlobDescriptor(descriptor.digest, descriptor.size)


class GrpcBlobBackend:
    def __init__(
        self,
        address: str,
        metadata: Callable[[], Metadata | None],
        *,
        final_status_wait: float = FINAL_STATUS_WAIT,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """Opens the channel (lazily connected; must run inside the server's event loop).
        ``metadata`` gives every call's metadata: the gateway's internal grant, if any.
        ``final_status_wait``: how long a failed send of a Write waits for the status blobsvc
        ends the call with (gateway.grpc_calls.WriteCall). ``credentials``: TLS (None:
        plaintext)."""
        self._final_status_wait = final_status_wait
        self._channel = tls.aio_channel(
            address,
            credentials,
            [*transport.channel_options(), *transport.bounded_windows()],
            interceptors.aio_backend_interceptors(),  # metrics, request id, tracing
        )
        self._stub = blob_pb2_grpc.BlobServiceStub(self._channel)  # type: ignore[no-untyped-call]
        # Read: a ReadRequest in, serialized ReadResponses out.
        self._read_raw = self._channel.unary_stream(
            transport.BLOB_READ,
            request_serializer=blob_pb2.ReadRequest.SerializeToString,
            response_deserializer=None,
        )
        # Write: serialized WriteRequests in, a WriteResponse out.
        self._write_raw = self._channel.stream_unary(
            transport.BLOB_WRITE,
            request_serializer=None,
            response_deserializer=blob_pb2.WriteResponse.FromString,
        )
        self._metadata = metadata

    async def close(self) -> None:
        await self._channel.close(None)

    async def stat(self, digest: str) -> BlobDescriptor:
        stat = await answer(
            self._stub.Stat, blob_pb2.StatRequest(digest=digest), metadata=self._metadata()
        )
        return _blob(stat.blob)

    async def put(self, data: bytes, digest: str, counted_as: str = "") -> BlobDescriptor:
        stored = await answer(
            self._stub.Put, blob_pb2.PutRequest(data=data, digest=digest), metadata=self._metadata()
        )
        if counted_as:
            metrics.BYTES_IN.labels(counted_as).inc(stored.blob.size)
        return _blob(stored.blob)

    async def upload_size(self, upload_id: str) -> int:
        status = await answer(
            self._stub.UploadStatus,
            blob_pb2.UploadStatusRequest(upload_id=upload_id),
            metadata=self._metadata(),
        )
        return int(status.size)

    async def commit(self, upload_id: str, digest: str) -> BlobDescriptor:
        committed = await answer(
            self._stub.Commit,
            blob_pb2.CommitRequest(upload_id=upload_id, digest=digest),
            metadata=self._metadata(),
        )
        return _blob(committed.blob)

    async def abort(self, upload_id: str) -> None:
        await answer(
            self._stub.Abort, blob_pb2.AbortRequest(upload_id=upload_id), metadata=self._metadata()
        )

    async def open_read(
        self, digest: str, offset: int, length: int, out: OutgoingData
    ) -> AsyncGenerator[bytes, None]:
        try:
            call = self._read_raw(
                blob_pb2.ReadRequest(digest=digest, offset=offset, limit=length),
                metadata=self._metadata(),
            )
            first = await call.read()  # blobsvc refuses a digest it lacks before any data
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        except CHANNEL_FAILURES as err:
            raise channel_failure(err) from None
        return _relay_read(call, first, length, out, digest)

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
        """See BlobBackend.write. The bytes are counted under ``incoming.method``, or under
        ``counted_as`` ("": not counted) when there is no ``incoming``: ``data`` once it was
        sent to blobsvc, each relayed message as it is taken from ``incoming``."""
        first = blob_pb2.WriteRequest(upload_id=upload_id, offset=offset, data=data)
        if commit is not None:
            first.commit = True
            first.commit_digest = commit.digest
            first.algorithm = commit.algorithm
            if commit.size is not None:
                first.commit_size = commit.size
        elif want_staged_digest:
            first.want_staged_digest = True
        try:
            raw_call = self._write_raw(  # type: ignore[call-arg]
                metadata=interceptors.with_request_id(self._metadata())
            )
        except CHANNEL_FAILURES as err:
            raise channel_failure(err) from None
        call = WriteCall(raw_call, self._final_status_wait)
        # A caller's first message was received whatever becomes of it; data of the domain's
        # own (a commit's last chunk) counts once it was sent.
        received = len(data) if incoming is not None else 0
        counter = incoming.method if incoming is not None else counted_as
        try:
            await call.send(first.SerializeToString())
            received = len(data)
            if incoming is not None:
                data_field, parse, check_size = (
                    incoming.data_field,
                    incoming.parse,
                    incoming.check_size,
                )
                async for raw in incoming.messages:
                    payload = wire.data_payload(raw, data_field)
                    if payload is None:
                        chunk = parse(raw)
                        check_size(len(chunk))
                        out = wire.data_message(transport.BLOB_WRITE_DATA, chunk)
                        received += len(chunk)
                    else:
                        check_size(len(payload))
                        out = wire.retag(raw, transport.BLOB_WRITE_DATA) if payload else b""
                        received += len(payload)
                    if out:
                        await call.send(out)
            written: blob_pb2.WriteResponse = await call.finish()
        except BaseException:
            call.cancel()
            raise
        finally:
            if counter:
                metrics.BYTES_IN.labels(counter).inc(received)
        return Written(
            written.size,
            _blob(written.blob) if written.HasField("blob") else None,
            written.staged_digest,
        )


async def _relay_read(
    call: grpc.aio.UnaryStreamCall, raw: Any, length: int, out: OutgoingData, digest: str
) -> AsyncGenerator[bytes, None]:
    """blobsvc's data messages re-tagged for the caller, ``out.head`` in front of the first.

    call.read() rather than the call's own async iterator: one await per message either way,
    without a generator layer of grpc's under this one.
    """
    data_field, head = out.data_field, out.head
    sent = 0
    try:
        while raw is not _EOF:
            payload = wire.data_payload(raw, transport.BLOB_READ_DATA)
            if payload is None:  # not a plain data message: parse it
                data = blob_pb2.ReadResponse.FromString(raw).data
                sent += len(data)
                chunk = wire.data_message(data_field, data)
            else:
                sent += len(payload)
                chunk = wire.retag(raw, data_field) if payload else b""
            if head:
                chunk, head = head + chunk, b""
            if chunk:
                yield chunk
            raw = await call.read()
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None
    except CHANNEL_FAILURES as err:
        raise channel_failure(err) from None
    finally:
        if not call.done():
            call.cancel()  # the caller went away
        metrics.BYTES_OUT.labels(out.method).inc(sent)
    if sent != length:
        # A store that lost bytes must not pass for a short blob.
        raise LinkedBlobError(
            grpc.StatusCode.DATA_LOSS,
            Reason.INTERNAL,
            f"blobsvc sent {sent} of {length} bytes of {digest}",
        )
    if head:
        yield head
