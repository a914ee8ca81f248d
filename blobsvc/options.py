"""Flags of `linkedblob serve blob`."""

from __future__ import annotations

import argparse

from blobsvc.limits import add_limit_options
from linkedblob import grants
from linkedblob.config import BLOB_PORT, add_option
from linkedblob.peers import add_peer_options

HELP = "the data plane: content-addressed bytes (linkedblob.blob.v1.BlobService)"
DEFAULT_PORT = BLOB_PORT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_peer_options(parser)
    add_option(
        parser,
        "--direct-port",
        type=int,
        default=-1,
        help="a second port for clients holding grants (the gateway's --blob-public-addr "
        "points here): TLS with --tls-cert but no client certificate, only Read, Write and "
        "UploadStatus with a read or write grant; needs --tls-client-ca, an --allow-* list and "
        "a grant secret. -1: none, 0 picks a free one",
    )
    add_option(
        parser, "--data", default="data/blobs", help="root directory of the filesystem store"
    )
    add_option(
        parser,
        "--storage",
        default="filesystem",
        choices=["filesystem", "memory"],
        help="storage driver",
    )
    add_option(
        parser,
        "--direct-io",
        default="auto",
        choices=["auto", "off"],
        help="filesystem driver: stage uploads and read uncached blobs with O_DIRECT, bypassing "
        "the page cache (auto: where the filesystem takes it); off: through the page cache",
    )
    add_option(
        parser,
        "--grant-secret",
        default="",
        help="secret shared with the gateway (at least 16 bytes; pass it in the environment, not "
        "on the command line); set, every call needs a grant signed with it (see "
        "linkedblob.grants); empty, none is needed",
    )
    grants.add_secret_file_option(parser)
    add_limit_options(parser)
