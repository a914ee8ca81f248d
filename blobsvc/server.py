"""`linkedblob serve blob`: builds the storage driver, the domain and the servicer, and runs
them on the shared bootstrap (health, reflection, metrics, graceful shutdown)."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import sys
from typing import Any

import grpc
from google.protobuf import message_factory

from blobsvc.servicer import RAW_REQUESTS, RAW_RESPONSES, SERVICE_NAME, BlobServicer
from blobsvc.storage import open_storage
from blobsvc.store import BlobStore
from linkedblob.blob.v1 import blob_pb2
from linkedblob.grants import Signer
from linkedblob.server import Service, run

# gRPC's BDP probing grows each stream's HTTP/2 receive window towards the link's bandwidth-delay
# product, so a client sending faster than we hash and write gets that much ahead, buffered in
# this process, per stream: a stream whose handler paused had 3-5 MiB accepted ahead with it
# and less than one 1 MiB message without it. On a machine loaded by other work, rounds of 8
# concurrent 32 MiB Writes peaked at 146-344 MiB with it, 107-127 MiB without (on a quieter
# machine both stay near 115 MiB). Without it a stream's window admits the message being
# read, whatever the blob size, at no throughput cost we could measure on loopback (a link
# whose round trip is long next to a message's transfer would want a larger window).
GRPC_OPTIONS = [("grpc.http2.bdp_probe", 0)]

# glibc gives each thread that contends for malloc an arena of its own (up to 8 per core), and
# each arena grows to its own peak: with grpc's threads allocating message buffers that the event
# loop frees, the process's footprint becomes a sum of peaks. On the loaded machine two arenas
# measured 15-30 MiB lower peaks during 8 concurrent Writes (on a quiet one, no difference),
# with the same throughput.
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc <malloc.h>


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """mallopt(M_ARENA_MAX): applies to arenas created from now on. No-op off glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


_HANDLER_FACTORIES: dict[tuple[bool, bool], Any] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handlers(servicer: BlobServicer) -> dict[str, grpc.RpcMethodHandler]:
    """BlobService's handlers as the generated add_BlobServiceServicer_to_server builds them,
    except that Write's requests and Read's responses skip protobuf (see blobsvc.servicer)."""
    service = blob_pb2.DESCRIPTOR.services_by_name["BlobService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_class: Any = message_factory.GetMessageClass(method.input_type)
        response_class: Any = message_factory.GetMessageClass(method.output_type)
        factory = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=None if method.name in RAW_REQUESTS else request_class.FromString,
            response_serializer=None
            if method.name in RAW_RESPONSES
            else response_class.SerializeToString,
        )
    return handlers


def serve(args: argparse.Namespace) -> int | None:
    try:
        signer = Signer(args.grant_secret) if args.grant_secret else None
    except ValueError as exc:
        print(f"linkedblob blob: --grant-secret: {exc}", file=sys.stderr)
        return 2
    limit_malloc_arenas()
    store = BlobStore(open_storage(args.storage, args.data))
    handlers = method_handlers(BlobServicer(store, signer))

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]

    run(
        Service("blob", [SERVICE_NAME], register, on_stop=store.close, extra_options=GRPC_OPTIONS),
        args.host,
        args.port,
        args.grace,
        args.metrics_port,
    )
    return 0
