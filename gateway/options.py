"""Flags of `linkedblob serve gateway`."""

from __future__ import annotations

import argparse

from linkedblob.config import BLOB_PORT, GATEWAY_PORT, LINK_PORT, add_option

HELP = "the public API (linkedblob.v1.Registry)"
DEFAULT_PORT = GATEWAY_PORT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--blob-addr", default=f"127.0.0.1:{BLOB_PORT}", help="blobsvc address")
    add_option(parser, "--link-addr", default=f"127.0.0.1:{LINK_PORT}", help="linksvc address")
    add_option(
        parser,
        "--enable-delete",
        action="store_true",
        help="allow DeleteBlob (off by default: FAILED_PRECONDITION / UNSUPPORTED)",
    )
