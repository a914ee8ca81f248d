"""`linkedblob serve blob`: builds the storage driver, the domain and the servicer, and runs
them on the shared bootstrap (health, reflection, metrics, graceful shutdown)."""

from __future__ import annotations

import argparse

import grpc

from blobsvc.servicer import SERVICE_NAME, BlobServicer
from blobsvc.storage import open_storage
from blobsvc.store import BlobStore
from linkedblob.blob.v1 import blob_pb2_grpc
from linkedblob.server import Service, run


def serve(args: argparse.Namespace) -> int | None:
    store = BlobStore(open_storage(args.storage, args.data))
    servicer = BlobServicer(store)

    def register(server: grpc.aio.Server) -> None:
        blob_pb2_grpc.add_BlobServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]

    run(
        Service("blob", [SERVICE_NAME], register, on_stop=store.close),
        args.host,
        args.port,
        args.grace,
        args.metrics_port,
    )
    return 0
