"""The direct path: bytes straight between the client and blobsvc, one hop instead of two, when
the gateway offers it (it shares a grant secret with blobsvc, as ``linkedblob up`` sets it up).

The gateway still decides access: it answers LocateBlob (a read) or StartUpload / GetUpload
with ``direct`` (a write) with blobsvc's address and a short-lived grant (linkedblob.grants),
which the client sends to blobsvc with its Read or Write. When the gateway offers no direct
access it is not asked again for a while; when blobsvc cannot be reached from here, transfers
go through the gateway for a while.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable, Iterator

import grpc
import grpc.experimental

from linkedblob import grants, tls, wire
from linkedblob.blob.v1 import blob_pb2
from linkedblob.client.channels import Gateway, client_channel_options, end_read
from linkedblob.client.errors import ClientError
from linkedblob.client.model import Chunks, Descriptor, DirectGrant, Upload
from linkedblob.client.sources import Pieces, RequestStream
from linkedblob.transport import BLOB_READ, BLOB_READ_DATA, BLOB_WRITE, BLOB_WRITE_DATA

# After a gateway said it offers no direct access, ask again only after this many seconds.
_DIRECT_RECHECK_SECONDS = 60.0
# After blobsvc could not be reached at an address, go through the gateway this long.
_UNREACHABLE_SECONDS = 30.0
# How long to wait for a connection to blobsvc before going through the gateway.
_CONNECT_TIMEOUT_SECONDS = 5.0
# A direct Write whose grant expires mid-stream (blobsvc checks it on every message) gets a
# new grant from the gateway and resumes from the staged size: the bytes sent but not staged are
# sent again from what is kept of the last ones sent (at least this much, or this many chunks).
_RESEND_BYTES = 8 * 1024 * 1024
_RESEND_CHUNKS = 8
_MAX_RENEWALS = 1000

# blobsvc's Read streams are consumed in the reader's thread: each message is handed over once
# (grpc core -> reader) instead of twice (-> the channel's spin thread -> reader), which pulls
# faster with less client CPU. Not for the gateway's ReadBlob, where the same was slower
# (measured: bench/README.md). Such a stream needs end_read when abandoned.
READ_IN_CALLER = (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)


class BlobsvcChannel:
    """A channel to one blobsvc address for direct transfers, and whether it answers.

    The connection state is followed as gRPC reports it, so a transfer learns whether blobsvc
    can be reached before it reads anything of its source: an address that refuses or does not
    answer within a few seconds is passed over (transfers go through the gateway) for a while.
    An address that answered before gets the whole timeout to answer again (blobsvc
    restarting); one that never did is given up at its first refusal.
    """

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self.channel = tls.channel(address, credentials, client_channel_options(READ_IN_CALLER))
        self.read = self.channel.unary_stream(
            BLOB_READ,
            request_serializer=blob_pb2.ReadRequest.SerializeToString,
            response_deserializer=None,
        )
        self.write = self.channel.stream_unary(
            BLOB_WRITE,
            request_serializer=None,
            response_deserializer=blob_pb2.WriteResponse.FromString,
        )
        self._state: grpc.ChannelConnectivity | None = None
        self._ever_ready = False
        # Whether the state has been anything but IDLE: until then the connection asked for
        # below is on its way.
        self._left_idle = False
        self._changed = threading.Condition()
        self._unreachable_until = 0.0
        # Connect now: grpc's connectivity poller only sees a later request to connect (as
        # channel_ready_future makes) at its next 0.2 s tick, which would delay every new
        # client's first direct transfer.
        self.channel.subscribe(self._on_state, try_to_connect=True)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        with self._changed:
            self._state = state
            self._ever_ready = self._ever_ready or state == grpc.ChannelConnectivity.READY
            self._left_idle = self._left_idle or state != grpc.ChannelConnectivity.IDLE
            self._changed.notify_all()

    def _settled(self) -> bool:
        """Connected, shut down, or refused before it ever answered (held by _changed)."""
        state = self._state
        return state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.SHUTDOWN) or (
            state == grpc.ChannelConnectivity.TRANSIENT_FAILURE and not self._ever_ready
        )

    def reachable(self, timeout: float = _CONNECT_TIMEOUT_SECONDS) -> bool:
        """Connected, or connects within ``timeout``; False when it fails or was found
        unreachable lately."""
        if time.monotonic() < self._unreachable_until:
            return False
        if self._state == grpc.ChannelConnectivity.READY:
            return True
        # Asks to connect again only when gone idle (a connection closed): a request left with
        # grpc's poller while one is under way may be acted on after close(), on a closed
        # channel (an exception in grpc's thread).
        ready = None
        if self._state == grpc.ChannelConnectivity.IDLE and self._left_idle:
            ready = grpc.channel_ready_future(self.channel)
        try:
            with self._changed:
                settled = self._changed.wait_for(self._settled, timeout)
                ok = settled and self._state == grpc.ChannelConnectivity.READY
        finally:
            if ready is not None:
                ready.cancel()
        if not ok:
            self.mark_unreachable()
        return ok

    def mark_unreachable(self) -> None:
        self._unreachable_until = time.monotonic() + _UNREACHABLE_SECONDS

    def close(self) -> None:
        self.channel.unsubscribe(self._on_state)
        self.channel.close()


class DirectPath:
    """Grants from the gateway and transfers with blobsvc: one channel per blobsvc address,
    kept until :meth:`close`. ``enabled=False`` never asks for direct access."""

    def __init__(self, gateway: Gateway, *, enabled: bool, chunk_size: int) -> None:
        self.gateway = gateway
        self.enabled = enabled
        self.chunk_size = chunk_size
        # Until when not to ask for direct access (the gateway said it offers none).
        self._off_until = 0.0
        self._blobsvcs: dict[str, BlobsvcChannel] = {}
        self._blobsvcs_lock = threading.Lock()

    def close(self) -> None:
        with self._blobsvcs_lock:
            blobsvcs, self._blobsvcs = list(self._blobsvcs.values()), {}
        for blobsvc in blobsvcs:
            blobsvc.close()

    def wanted(self) -> bool:
        """Whether to ask the gateway for direct access now."""
        return self.enabled and time.monotonic() >= self._off_until

    def not_offered(self, e: ClientError) -> bool:
        """Whether the gateway's answer says it offers no direct access; if so, it is not
        asked again for a while."""
        if (
            e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "UNSUPPORTED"
        ) or e.code == grpc.StatusCode.UNIMPLEMENTED:  # a gateway older than direct access
            self._off_until = time.monotonic() + _DIRECT_RECHECK_SECONDS
            return True
        return False

    def blobsvc(self, address: str) -> BlobsvcChannel:
        with self._blobsvcs_lock:
            blobsvc = self._blobsvcs.get(address)
            if blobsvc is None:
                blobsvc = self._blobsvcs[address] = BlobsvcChannel(
                    address, self.gateway.blobsvc_credentials
                )
            return blobsvc

    # --- grants -------------------------------------------------------------------------------

    def locate(self, repository: str, digest: str) -> tuple[Descriptor, DirectGrant]:
        """A blob's descriptor and a grant to read it from blobsvc; FAILED_PRECONDITION /
        UNSUPPORTED when the gateway does not offer direct access."""
        msg = self.gateway.locate(repository, digest)
        grant = DirectGrant.from_proto(msg.direct)
        if grant is None:
            raise ClientError(
                grpc.StatusCode.FAILED_PRECONDITION, "UNSUPPORTED", "no direct access offered"
            )
        return Descriptor.from_proto(msg.blob), grant

    def start_upload(self, repository: str) -> Upload | None:
        """StartUpload with direct access; None (and no upload started) when not offered."""
        try:
            return self.gateway.start_upload(repository, True)
        except ClientError as e:
            if self.not_offered(e):
                return None
            raise

    def get_upload(self, repository: str, upload_id: str) -> Upload | None:
        """GetUpload with a fresh grant; None when direct access is not offered."""
        try:
            return self.gateway.get_upload(repository, upload_id, True)
        except ClientError as e:
            if self.not_offered(e):
                return None
            raise

    # --- transfers ----------------------------------------------------------------------------

    def write(
        self,
        blobsvc: BlobsvcChannel,
        grant: DirectGrant,
        upload_id: str,
        offset: int,
        chunks: Pieces,
        algorithm: str = "",
        *,
        repository: str = "",
    ) -> int:
        """Appends ``chunks`` at ``offset`` with blobsvc Write streams; the staged size after.
        ``algorithm``: what blobsvc hashes a new upload with as bytes arrive (the commit's, so
        that it re-reads nothing; sha256 by default). With ``repository``, a grant that
        expires mid-stream is renewed (GetUpload with direct) and the write resumes from the
        staged size."""
        resend = _Resend(chunks, offset, max(_RESEND_BYTES, _RESEND_CHUNKS * self.chunk_size))
        for _ in range(_MAX_RENEWALS):
            try:
                return self._write_once(
                    blobsvc, grant, upload_id, offset, resend.from_offset(offset), algorithm
                )
            except ClientError as e:
                if not repository or e.metadata.get(grants.EXPIRED[0]) != grants.EXPIRED[1]:
                    raise
                fresh = self.get_upload(repository, upload_id)
                if fresh is None or fresh.direct is None or not resend.covers(fresh.offset):
                    raise
                grant, offset = fresh.direct, fresh.offset
        raise ClientError(
            grpc.StatusCode.UNAUTHENTICATED, "UNAUTHORIZED", "grants keep expiring; giving up"
        )

    def _write_once(
        self,
        blobsvc: BlobsvcChannel,
        grant: DirectGrant,
        upload_id: str,
        offset: int,
        chunks: Pieces,
        algorithm: str,
    ) -> int:
        """One blobsvc Write stream appending ``chunks`` at ``offset``."""
        header = blob_pb2.WriteRequest(
            upload_id=upload_id, offset=offset, algorithm=algorithm if offset == 0 else ""
        ).SerializeToString()
        stream = RequestStream(header, BLOB_WRITE_DATA, chunks, self.chunk_size)
        try:
            written: blob_pb2.WriteResponse = stream.send(
                lambda requests: blobsvc.write(requests, metadata=grant.metadata)
            )
        except ClientError as e:
            if offset > 0 and e.reason == "BLOB_UPLOAD_UNKNOWN":
                # Never written: the upload is at 0 (as GetUpload says), as the gateway reports it.
                raise ClientError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    "BLOB_UPLOAD_INVALID",
                    f"upload {upload_id} has 0 bytes; cannot write at {offset}",
                    {"size": "0"},
                ) from e.__cause__
            raise
        return written.size

    def open_read(
        self, repository: str, digest: str, offset: int, length: int
    ) -> tuple[Descriptor, Chunks] | None:
        """Locates the blob and opens its read from blobsvc: the descriptor, then the data as
        views into the received messages (no copies). None when direct access is not offered
        or blobsvc cannot be reached (then read through the gateway)."""
        try:
            desc, grant = self.locate(repository, digest)
        except ClientError as e:
            if not self.not_offered(e):
                raise
            return None
        chunks = self._read(desc, grant, offset, length)
        return None if chunks is None else (desc, chunks)

    def _read(
        self, desc: Descriptor, grant: DirectGrant, offset: int, length: int
    ) -> Chunks | None:
        """blobsvc Read of the range; None when blobsvc cannot be reached (or the range is
        not valid: the gateway's ReadBlob then answers with its error)."""
        if offset < 0 or length < 0 or offset > desc.size:
            return None
        blobsvc = self.blobsvc(grant.address)
        if not blobsvc.reachable():
            return None
        available = desc.size - offset
        want = available if length == 0 else min(length, available)
        if want == 0:
            return _no_chunks()
        stream = blobsvc.read(
            blob_pb2.ReadRequest(digest=desc.digest, offset=offset, limit=want),
            metadata=grant.metadata,
        )
        try:
            first: bytes | None = next(stream, None)  # type: ignore[call-overload]
        except grpc.RpcError as err:
            end_read(stream)
            if err.code() == grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                blobsvc.mark_unreachable()
                return None
            raise ClientError.from_rpc_error(err) from err

        def data() -> Chunks:
            try:
                raw = first
                while raw is not None:
                    view = wire.data_payload(raw, BLOB_READ_DATA)
                    if view is None:
                        view = memoryview(blob_pb2.ReadResponse.FromString(raw).data)
                    yield view
                    raw = next(stream, None)  # type: ignore[call-overload]
            finally:
                end_read(stream)

        return data()


def _no_chunks() -> Chunks:
    yield from ()


class _Resend:
    """The chunks of a direct write, keeping the last ``keep`` bytes sent (at least) so that a
    stream cut by an expired grant can resume from the staged size. Each :meth:`from_offset`
    iterator supersedes the previous one (which gRPC's sending thread may still hold: it stops
    taking chunks)."""

    def __init__(self, chunks: Pieces, offset: int, keep: int) -> None:
        self._source: Iterator[bytes | memoryview] = iter(chunks)
        self._kept: collections.deque[memoryview] = collections.deque()
        self._kept_from = offset  # the offset of the first kept chunk
        self._end = offset  # the offset after the last chunk taken from the source
        self._keep = keep
        self._lock = threading.Lock()
        self._generation = 0

    def covers(self, offset: int) -> bool:
        with self._lock:
            return self._kept_from <= offset <= self._end

    def _kept_at(self, position: int) -> memoryview | None:
        start = self._kept_from
        for chunk in self._kept:
            if start + len(chunk) > position:
                return chunk[position - start :]
            start += len(chunk)
        return None

    def _take(self) -> memoryview | None:
        raw = next(self._source, None)
        if raw is None:
            return None
        view = memoryview(raw).cast("B")
        self._kept.append(view)
        self._end += len(view)
        while self._kept and self._end - self._kept_from - len(self._kept[0]) >= self._keep:
            self._kept_from += len(self._kept.popleft())
        return view

    def from_offset(self, offset: int) -> Iterable[bytes | memoryview]:
        with self._lock:
            self._generation += 1
            generation = self._generation
        position = offset
        while True:
            with self._lock:
                if generation != self._generation:
                    return
                chunk = self._kept_at(position) if position < self._end else self._take()
            if chunk is None:
                return
            position += len(chunk)
            yield chunk
