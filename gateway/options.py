"""Flags of `linkedblob serve gateway`."""

from __future__ import annotations

import argparse

from gateway.auth import config as auth_config
from linkedblob import grants
from linkedblob.config import (
    BLOB_PORT,
    GATEWAY_PORT,
    LINK_PORT,
    add_duration_option,
    add_option,
    parse_duration,
)
from linkedblob.tls import add_client_tls_options

HELP = "the public API (linkedblob.v1.Registry)"
DEFAULT_PORT = GATEWAY_PORT

# How long a (repository, digest) resolution is served from the gateway's memory: the longest a
# link deleted through ANOTHER gateway stays visible here (a delete through this one is seen at
# once).
DEFAULT_LINK_CACHE_TTL = 5.0
DEFAULT_LINK_CACHE_SIZE = 10_000
# How long a lease protects a digest from garbage collection between the commit of its bytes
# and their link (linksvc's default; it allows at most MAX_LEASE_TTL).
DEFAULT_LEASE_TTL = 600.0
MAX_LEASE_TTL = 86_400.0

# Limits (gateway.limits).
DEFAULT_IDLE_STREAM_TIMEOUT = "1m"
DEFAULT_MAX_OPEN_UPLOADS = 256
DEFAULT_MAX_UPLOADS_PER_REPOSITORY = 64
DEFAULT_SESSION_RATE = 50.0
DEFAULT_SESSION_BURST = 500


def add_grant_options(parser: argparse.ArgumentParser) -> None:
    """The grant secret file and the read grants' lifetime."""
    grants.add_secret_file_option(parser)
    add_duration_option(
        parser,
        "--read-grant-ttl",
        default="60s",
        help="how long a read grant (LocateBlob) is valid, checked when a Read starts: a deleted "
        "link stays readable through one already issued at most this long, plus a read in "
        "progress",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(
        parser,
        "--blob-addr",
        default=f"127.0.0.1:{BLOB_PORT}",
        help="blobsvc address: host:port, dns:///name:port or ipv4:a:port,b:port; calls are "
        "balanced over every address it names (round_robin)",
    )
    add_option(
        parser,
        "--link-addr",
        default=f"127.0.0.1:{LINK_PORT}",
        help="linksvc address, as --blob-addr",
    )
    add_client_tls_options(parser)  # --backend-tls-ca/-cert/-key
    add_option(
        parser,
        "--enable-delete",
        action="store_true",
        help="allow DeleteBlob (off by default: FAILED_PRECONDITION / UNSUPPORTED)",
    )
    add_option(
        parser,
        "--grant-secret",
        default="",
        help="secret shared with blobsvc to sign grants (at least 16 bytes; pass it in the "
        "environment, not on the command line); set, the gateway offers clients direct access "
        "to blobsvc (LocateBlob, direct uploads) and signs its own calls to blobsvc",
    )
    add_option(
        parser,
        "--blob-public-addr",
        default="",
        help="blobsvc's address as clients reach it, handed out with grants (default: "
        "--blob-addr); with mTLS at blobsvc, its --direct-port",
    )
    add_option(
        parser,
        "--grant-ttl",
        type=parse_duration,
        default=300.0,
        help="how long a write grant handed to a client is valid (checked on every message of a "
        "Write; the client then asks for a new one)",
    )
    add_grant_options(parser)
    add_option(
        parser,
        "--link-cache-ttl",
        type=parse_duration,
        default=DEFAULT_LINK_CACHE_TTL,
        help="how long a resolved link is served from memory (bounds how long a delete through "
        "another gateway goes unseen here); 0 turns the cache off",
    )
    add_option(
        parser,
        "--link-cache-size",
        type=int,
        default=DEFAULT_LINK_CACHE_SIZE,
        help="most resolved links kept (least recently used dropped first)",
    )
    add_option(
        parser,
        "--lease-ttl",
        type=parse_duration,
        default=DEFAULT_LEASE_TTL,
        help="how long a lease protects a blob being committed from garbage collection until it "
        f"is linked (at most {MAX_LEASE_TTL:.0f}s); a commit that takes longer is answered "
        "ABORTED and pushed again",
    )
    auth_config.add_arguments(parser)
    add_limit_arguments(parser)


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's limit flags (gateway.limits)."""
    add_duration_option(
        parser,
        "--idle-stream-timeout",
        default=DEFAULT_IDLE_STREAM_TIMEOUT,
        help="end a PushBlob or WriteUpload stream whose caller sends nothing for this long "
        "(RESOURCE_EXHAUSTED / STREAM_IDLE; a push's staged bytes are dropped); 0: never",
    )
    add_option(
        parser,
        "--max-open-uploads",
        type=int,
        default=DEFAULT_MAX_OPEN_UPLOADS,
        help="most PushBlob and WriteUpload streams in progress at once; more are refused "
        "(RESOURCE_EXHAUSTED / TOO_MANY_REQUESTS); 0: no limit",
    )
    add_option(
        parser,
        "--max-uploads-per-repository",
        type=int,
        default=DEFAULT_MAX_UPLOADS_PER_REPOSITORY,
        help="most PushBlob and WriteUpload streams in progress into one repository; 0: no limit",
    )
    add_option(
        parser,
        "--session-rate",
        type=float,
        default=DEFAULT_SESSION_RATE,
        help="StartUpload calls per second one caller (identity, else address) may make on "
        "average, beyond --session-burst; 0: no limit",
    )
    add_option(
        parser,
        "--session-burst",
        type=int,
        default=DEFAULT_SESSION_BURST,
        help="StartUpload calls one caller may make at once before --session-rate applies",
    )
