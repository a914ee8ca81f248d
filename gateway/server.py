"""`linkedblob serve gateway`: the Registry servicer on the shared server bootstrap."""

from __future__ import annotations

import argparse
import sys

import grpc

from gateway.backends import Backends, bounded_windows
from gateway.direct import DirectAccess
from gateway.linkcache import LinkCache
from gateway.servicer import RegistryServicer
from linkedblob.server import Service, add_handlers, run
from linkedblob.server import method_handlers as server_method_handlers
from linkedblob.v1 import registry_pb2

SERVICE_NAME = "linkedblob.v1.Registry"


# The byte streams take or give raw serialized messages (see linkedblob.wire): their requests
# reach the servicer unparsed, or their responses leave it already serialized.
_RAW_REQUESTS = frozenset({"PushBlob", "WriteUpload"})
_RAW_RESPONSES = frozenset({"ReadBlob"})


def method_handlers(servicer: RegistryServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The Registry's handlers; the byte streams skip (de)serialization of their data messages."""
    return server_method_handlers(
        registry_pb2.DESCRIPTOR.services_by_name["Registry"],
        servicer,
        _RAW_REQUESTS,
        _RAW_RESPONSES,
    )


def add_registry(servicer: RegistryServicer, server: grpc.aio.Server) -> None:
    add_handlers(server, SERVICE_NAME, method_handlers(servicer))


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
