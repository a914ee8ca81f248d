"""The gateway's connections to blobsvc and linksvc: one aio channel each, reused by every call.

Metadata calls go through the generated stubs. The two byte-streaming methods of blobsvc (Read,
Write) are also opened by their full method name with raw-bytes (de)serializers, so the gateway
can relay data messages without parsing them (see linkedblob.wire).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from linkedblob.blob.v1 import blob_pb2, blob_pb2_grpc
from linkedblob.config import STREAM_CHUNK_BYTES, TRANSPORT_LIMIT_BYTES
from linkedblob.link.v1 import link_pb2_grpc


def channel_options() -> list[tuple[str, int | str]]:
    return [
        ("grpc.max_receive_message_length", TRANSPORT_LIMIT_BYTES),
        ("grpc.max_send_message_length", TRANSPORT_LIMIT_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # A restarted backend is found again quickly instead of after grpc's 1-120 s backoff.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        *bounded_windows(),
    ]


def bounded_windows() -> list[tuple[str, int]]:
    """HTTP/2 flow control for a relay: a fixed 1 MiB window per stream, both on the gateway's
    server (client -> gateway) and on its backend channels (blobsvc -> gateway).

    With grpc's default BDP probing each stream's receive window grows to at least 4 MiB, and a
    relayed stream whose sender is faster than the next hop fills it: the gateway grew ~22 MiB
    per concurrent relayed push (peak ~250-290 MiB under 8 concurrent 32 MiB pushes, kept by the
    1 GiB trim threshold). With a fixed 1 MiB window it stays at ~115-140 MiB, and relayed
    throughput is unchanged within this machine's noise (gRPC still opens the window to a whole
    message while one is being read).
    """
    return [
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", STREAM_CHUNK_BYTES),
    ]


@dataclass
class Backends:
    blob_channel: grpc.aio.Channel
    link_channel: grpc.aio.Channel
    blob: blob_pb2_grpc.BlobServiceAsyncStub
    link: link_pb2_grpc.LinkServiceAsyncStub
    # blobsvc Read: ReadRequest in, raw serialized ReadResponse messages out.
    read_raw: grpc.aio.UnaryStreamMultiCallable
    # blobsvc Write: raw serialized WriteRequest messages in, WriteResponse out.
    write_raw: grpc.aio.StreamUnaryMultiCallable

    @classmethod
    def connect(cls, blob_addr: str, link_addr: str) -> Backends:
        """Opens the channels (lazily connected; must run inside the server's event loop)."""
        blob_channel = grpc.aio.insecure_channel(blob_addr, options=channel_options())
        link_channel = grpc.aio.insecure_channel(link_addr, options=channel_options())
        return cls(
            blob_channel=blob_channel,
            link_channel=link_channel,
            blob=blob_pb2_grpc.BlobServiceStub(blob_channel),  # type: ignore[arg-type]
            link=link_pb2_grpc.LinkServiceStub(link_channel),  # type: ignore[arg-type]
            read_raw=blob_channel.unary_stream(
                "/linkedblob.blob.v1.BlobService/Read",
                request_serializer=blob_pb2.ReadRequest.SerializeToString,
                response_deserializer=None,
            ),
            write_raw=blob_channel.stream_unary(
                "/linkedblob.blob.v1.BlobService/Write",
                request_serializer=None,
                response_deserializer=blob_pb2.WriteResponse.FromString,
            ),
        )

    async def close(self) -> None:
        await self.blob_channel.close(None)
        await self.link_channel.close(None)
