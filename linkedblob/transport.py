"""What every gRPC channel of linkedblob shares: channel options, the raw byte-streaming
methods' paths and their data fields' numbers.

The byte-streaming methods are also called and served with raw-bytes (de)serializers, so the
client, the gateway and blobsvc build and read their data messages without protobuf objects
(see :mod:`linkedblob.wire`). Their paths and field numbers come from the generated
descriptors, so a change in protos/ cannot leave a stale number here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from google.protobuf import descriptor

from linkedblob.blob.v1 import blob_pb2
from linkedblob.config import STREAM_CHUNK_BYTES, TRANSPORT_LIMIT_BYTES
from linkedblob.v1 import registry_pb2

ChannelOptions = list[tuple[str, int | str]]

# Every channel balances its calls over all the addresses its target resolves to (a DNS name
# of several A records, e.g. a headless Kubernetes Service: ``dns:///name:port``, or
# ``ipv4:10.0.0.1:50052,10.0.0.2:50052``), instead of gRPC's default pick_first, which sends
# every call to the first address that connects. A plain ``host:port`` is a DNS name too: one
# address, the same as before. gRPC re-resolves the name when a connection drops (and every
# 30 s at most), so replicas that come and go are found; servers close connections past
# --max-connection-age (linkedblob.limits), so clients of a ClusterIP Service move over too.
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def retrying_service_config(service: str, methods: Sequence[str]) -> str:
    """The service config with gRPC's own retries of ``methods`` (idempotent ones only) of
    ``service`` on UNAVAILABLE: up to 5 attempts, 0.1-1 s apart.

    round_robin reconnects as soon as a connection drops, so a server restarting is in
    connection backoff when it comes back, and a call made then fails at once with UNAVAILABLE
    (pick_first waited for a new connection on the next call instead)."""
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": service, "method": m} for m in methods],
                    "retryPolicy": {
                        "maxAttempts": 5,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


def channel_options(
    *, max_reconnect_backoff_ms: int = 2_000, service_config: str = SERVICE_CONFIG
) -> ChannelOptions:
    """Options of a channel to any linkedblob server: round_robin over the target's addresses,
    message limits, keepalive, and quick reconnection (a restarted server is found within a
    fraction of a second, not after grpc's 1-120 s backoff)."""
    return [
        ("grpc.service_config", service_config),
        ("grpc.max_receive_message_length", TRANSPORT_LIMIT_BYTES),
        ("grpc.max_send_message_length", TRANSPORT_LIMIT_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", max_reconnect_backoff_ms),
    ]


def bounded_windows() -> ChannelOptions:
    """HTTP/2 flow control for a relay: a fixed window of one stream chunk per stream, on the
    gateway's server and on its backend channels.

    With grpc's default BDP probing each stream's window grows to several MiB, and a relayed
    stream whose sender outruns the next hop fills it, so a relay's memory would grow with
    every concurrent stream; measurements in bench/README.md ("Gateway memory").
    """
    return [
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", STREAM_CHUNK_BYTES),
    ]


def method_path(service: descriptor.ServiceDescriptor, method: str) -> str:
    """The HTTP/2 path of ``method``: ``/package.Service/Method``."""
    return f"/{service.full_name}/{service.methods_by_name[method].name}"


def data_field(message: type) -> int:
    """The number of the ``data`` field of a generated message class."""
    return int(message.DESCRIPTOR.fields_by_name["data"].number)  # type: ignore[attr-defined]


_REGISTRY = registry_pb2.DESCRIPTOR.services_by_name["Registry"]
_BLOB_SERVICE = blob_pb2.DESCRIPTOR.services_by_name["BlobService"]

# The gateway's byte streams.
PUSH_BLOB = method_path(_REGISTRY, "PushBlob")
WRITE_UPLOAD = method_path(_REGISTRY, "WriteUpload")
READ_BLOB = method_path(_REGISTRY, "ReadBlob")
PUSH_BLOB_DATA = data_field(registry_pb2.PushBlobRequest)
WRITE_UPLOAD_DATA = data_field(registry_pb2.WriteUploadRequest)
READ_BLOB_DATA = data_field(registry_pb2.ReadBlobResponse)

# blobsvc's byte streams.
BLOB_READ = method_path(_BLOB_SERVICE, "Read")
BLOB_WRITE = method_path(_BLOB_SERVICE, "Write")
BLOB_READ_DATA = data_field(blob_pb2.ReadResponse)
BLOB_WRITE_DATA = data_field(blob_pb2.WriteRequest)
