"""`linkedblob serve blob`: builds the storage driver, the domain and the servicer, and runs
them on the shared bootstrap (health, reflection, metrics, graceful shutdown)."""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from blobsvc import roles
from blobsvc.limits import StreamLimits
from blobsvc.servicer import RAW_REQUESTS, RAW_RESPONSES, SERVICE_NAME, BlobServicer
from blobsvc.storage import open_storage
from blobsvc.store import BlobStore
from linkedblob import peers, tls
from linkedblob.blob.v1 import blob_pb2
from linkedblob.grants import signer_from_args
from linkedblob.health import directory_writable
from linkedblob.limits import ServerLimits
from linkedblob.server import Service, add_handlers, run
from linkedblob.server import method_handlers as server_method_handlers
from linkedblob.tuning import limit_malloc_arenas

# gRPC's BDP probing grows each stream's HTTP/2 receive window towards the link's bandwidth-delay
# product, so a client sending faster than we hash and write gets that much ahead, buffered in
# this process, per stream, and concurrent Writes peak higher. Without it a stream's window
# admits the message being read, whatever the blob size, at no throughput cost we could measure
# on loopback (a link whose round trip is long next to a message's transfer would want a larger
# window). Measured: bench/README.md, section "blobsvc: memory".
GRPC_OPTIONS = [("grpc.http2.bdp_probe", 0)]

# Two malloc arenas instead of up to 8 per core: lower peaks during concurrent Writes on a
# loaded machine, with the same throughput (measured: bench/README.md, section "blobsvc:
# memory"; see linkedblob.tuning.limit_malloc_arenas).
MALLOC_ARENAS = 2


def method_handlers(servicer: BlobServicer) -> dict[str, grpc.RpcMethodHandler]:
    """BlobService's handlers; Write's requests and Read's responses skip protobuf (see
    blobsvc.servicer)."""
    return server_method_handlers(
        blob_pb2.DESCRIPTOR.services_by_name["BlobService"], servicer, RAW_REQUESTS, RAW_RESPONSES
    )


def serve(args: argparse.Namespace) -> int | None:
    try:
        signer = signer_from_args(args)
    except ValueError as exc:
        print(f"linkedblob blob: {exc}", file=sys.stderr)
        return 2
    direct = args.direct_port >= 0
    try:
        credentials = tls.server_credentials_from_args(args)
        authorizer = peers.authorizer_from_args(args, roles.TABLE, direct=direct)
        if direct and signer is None:
            raise peers.PeerConfigError("--direct-port needs a grant secret")
    except ValueError as exc:
        tls.exit_with("blob", exc)
    # The direct port: server TLS only (the same files, no client certificate).
    direct_credentials = (
        tls.server_credentials(args.tls_cert, args.tls_key) if direct and credentials else None
    )
    limit_malloc_arenas(MALLOC_ARENAS)
    storage = open_storage(args.storage, args.data, direct_io=args.direct_io == "auto")
    store = BlobStore(storage)  # open_storage wraps the driver in its metrics
    limits = StreamLimits(args.idle_stream_timeout, args.max_open_uploads)
    handlers = method_handlers(BlobServicer(store, signer, limits))

    def register(server: grpc.aio.Server) -> None:
        add_handlers(server, SERVICE_NAME, handlers)

    run(
        Service(
            "blob",
            [SERVICE_NAME],
            register,
            on_stop=store.close,
            extra_options=GRPC_OPTIONS,
            secured=signer is not None or authorizer is not None,
            credentials=credentials,
            interceptors=[authorizer] if authorizer else [],
            listeners=[("direct", args.direct_port, direct_credentials)] if direct else [],
            limits=ServerLimits.from_args(args),
            # Ready while a file can be written where uploads are staged (memory: always).
            readiness=directory_writable(os.path.join(os.path.abspath(args.data), "tmp"))
            if args.storage == "filesystem"
            else None,
        ),
        args.host,
        args.port,
        args.grace,
        args.metrics_port,
        open_=args.open,
    )
    return 0
