"""`linkedblob serve gateway`: the Registry servicer on the shared server bootstrap."""

from __future__ import annotations

import argparse
import sys

import grpc

from gateway.auth.config import AuthConfigError, build_access
from gateway.direct import GrantIssuer
from gateway.grpc_blob import GrpcBlobBackend
from gateway.grpc_link import GrpcLinkBackend
from gateway.limits import Limits, LimitSettings
from gateway.linkcache import CachedLinks, LinkCache
from gateway.model import LinkedBlob
from gateway.options import MAX_LEASE_TTL
from gateway.registry import Registry
from gateway.servicer import RegistryServicer
from gateway.uploads import Uploads
from linkedblob import requestid, tls
from linkedblob.grants import signer_from_args
from linkedblob.health import PeerHealth
from linkedblob.limits import ServerLimits
from linkedblob.server import Service, add_handlers, run
from linkedblob.server import method_handlers as server_method_handlers
from linkedblob.transport import bounded_windows
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


def _server_windows() -> list[tuple[str, int]]:
    """The relay's fixed stream windows (transport.bounded_windows) on the gateway's server too,
    client -> gateway, as on its backend channels."""
    return [(name, int(value)) for name, value in bounded_windows()]


def serve(args: argparse.Namespace) -> int | None:
    try:
        grants = GrantIssuer(
            signer_from_args(args),
            args.blob_public_addr or args.blob_addr,
            args.grant_ttl,
            args.read_grant_ttl,
        )
    except ValueError as exc:
        print(f"linkedblob gateway: {exc}", file=sys.stderr)
        return 2
    if not 1 <= args.lease_ttl <= MAX_LEASE_TTL:
        print(
            f"linkedblob gateway: --lease-ttl must be 1-{MAX_LEASE_TTL:.0f} seconds",
            file=sys.stderr,
        )
        return 2
    try:
        server_tls = tls.server_credentials_from_args(args)
        backend_tls = tls.client_credentials_from_args(args)
    except ValueError as exc:
        tls.exit_with("gateway", exc)
    try:
        access = build_access(args)
    except AuthConfigError as exc:
        print(f"linkedblob gateway: {exc}", file=sys.stderr)
        return 2
    cache: LinkCache[LinkedBlob] = LinkCache(args.link_cache_ttl, args.link_cache_size)
    limits = Limits(LimitSettings.from_args(args))
    opened: list[GrpcBlobBackend | GrpcLinkBackend] = []
    registries: list[Registry] = []
    # Ready while both backends are (their own readiness, asked of any replica).
    backends = PeerHealth([("blobsvc", args.blob_addr), ("linksvc", args.link_addr)], backend_tls)

    def register(server: grpc.aio.Server) -> None:
        # Runs inside the server's event loop, where aio channels must be created.
        blobs = GrpcBlobBackend(args.blob_addr, grants.internal_metadata, credentials=backend_tls)
        links = GrpcLinkBackend(args.link_addr, backend_tls)
        opened.extend((blobs, links))
        cached_links = CachedLinks(links, cache)
        registry = Registry(
            blobs, cached_links, enable_delete=args.enable_delete, lease_ttl=args.lease_ttl
        )
        registries.append(registry)
        uploads = limits.limit_session_starts(
            Uploads(blobs, cached_links, lease_ttl=args.lease_ttl)
        )
        servicer = RegistryServicer(registry, uploads, grants, access)
        add_handlers(server, SERVICE_NAME, limits.wrap(method_handlers(servicer)))

    async def on_stop() -> None:
        # The registry's pending cleanups first: they call blobsvc, whose channel closes next.
        for registry in registries:
            await registry.close()
        for backend in opened:
            await backend.close()
        await backends.close()

    service = Service(
        "gateway",
        [SERVICE_NAME],
        register,
        on_stop,
        _server_windows(),
        secured=access.secured,
        credentials=server_tls,
        limits=ServerLimits.from_args(args),
        readiness=backends.check,
    )
    requestid.serve_as_edge()  # the gateway makes, passes on and returns x-request-id
    run(
        service,
        args.host,
        args.port,
        args.grace,
        args.metrics_port,
        open_=args.open,
    )
    return None
