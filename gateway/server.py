"""`linkedblob serve gateway`: the Registry servicer on the shared server bootstrap."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc
from google.protobuf import message_factory

from gateway.backends import Backends, bounded_windows
from gateway.direct import DirectAccess
from gateway.linkcache import LinkCache
from gateway.servicer import RegistryServicer
from linkedblob.server import Service, run
from linkedblob.v1 import registry_pb2

SERVICE_NAME = "linkedblob.v1.Registry"


# The byte streams take or give raw serialized messages (see linkedblob.wire): their requests
# reach the servicer unparsed, or their responses leave it already serialized.
_RAW_REQUESTS = frozenset({"PushBlob", "WriteUpload"})
_RAW_RESPONSES = frozenset({"ReadBlob"})

_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handlers(servicer: RegistryServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The Registry's handlers, as the generated add_RegistryServicer_to_server builds them,
    except that the byte streams skip (de)serialization of their data messages."""
    service = registry_pb2.DESCRIPTOR.services_by_name["Registry"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_class: Any = message_factory.GetMessageClass(method.input_type)
        response_class: Any = message_factory.GetMessageClass(method.output_type)
        factory: Any = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=None if method.name in _RAW_REQUESTS else request_class.FromString,
            response_serializer=None
            if method.name in _RAW_RESPONSES
            else response_class.SerializeToString,
        )
    return handlers


def add_registry(servicer: RegistryServicer, server: grpc.aio.Server) -> None:
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]


def serve(args: argparse.Namespace) -> int | None:
    try:
        direct = DirectAccess(
            args.grant_secret, args.blob_public_addr or args.blob_addr, args.grant_ttl
        )
    except ValueError as exc:
        print(f"linkedblob gateway: --grant-secret: {exc}", file=sys.stderr)
        return 2
    cache: LinkCache[registry_pb2.Descriptor] = LinkCache(args.link_cache_ttl, args.link_cache_size)
    opened: list[Backends] = []

    def register(server: grpc.aio.Server) -> None:
        # Runs inside the server's event loop, where aio channels must be created.
        backends = Backends.connect(args.blob_addr, args.link_addr)
        opened.append(backends)
        servicer = RegistryServicer(
            backends, enable_delete=args.enable_delete, direct=direct, cache=cache
        )
        add_registry(servicer, server)

    async def on_stop() -> None:
        for backends in opened:
            await backends.close()

    run(
        Service("gateway", [SERVICE_NAME], register, on_stop, bounded_windows()),
        args.host,
        args.port,
        args.grace,
        args.metrics_port,
    )
    return None
