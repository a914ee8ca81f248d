"""Flags of `linkedblob gc`, `linkedblob fsck` and `linkedblob serve gc`.

The durations' environment variables are LINKEDBLOB_GC_*: the servers' LINKEDBLOB_GRACE (seconds
to drain on SIGTERM) must never become the collector's grace period.
"""

from __future__ import annotations

import argparse

from linkedblob import grants
from linkedblob.config import (
    BLOB_PORT,
    GC_PORT,
    LINK_PORT,
    add_duration_option,
    add_option,
    add_telemetry_options,
)
from linkedblob.tls import add_client_tls_options

HELP = "the garbage collector, every --interval (runner lock, metrics, health)"
DEFAULT_PORT = GC_PORT
# `serve gc` adds its own server flags: the shared ones' --grace (drain seconds) is not its.
OWN_SERVER_OPTIONS = True


def add_backends(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--link-addr", default=f"127.0.0.1:{LINK_PORT}", help="linksvc address")
    add_option(parser, "--blob-addr", default=f"127.0.0.1:{BLOB_PORT}", help="blobsvc address")
    add_client_tls_options(parser)  # --backend-tls-ca/-cert/-key
    add_option(
        parser,
        "--grant-secret",
        default="",
        help="blobsvc's grant secret, when it has one (pass it in the environment, not on the "
        "command line): the collector signs itself an internal grant",
    )
    grants.add_secret_file_option(parser)


def add_upload_expiry(parser: argparse.ArgumentParser) -> None:
    add_duration_option(
        parser,
        "--upload-expiry",
        default="24h",
        env="LINKEDBLOB_GC_UPLOAD_EXPIRY",
        help="idle time after which an upload (session, staging area) is abandoned",
    )


def add_collection(parser: argparse.ArgumentParser) -> None:
    """The flags of a GC run."""
    add_backends(parser)
    add_duration_option(
        parser,
        "--grace",
        default="24h",
        env="LINKEDBLOB_GC_GRACE",
        help="how long an unreferenced blob stays marked before its bytes may be deleted",
    )
    add_upload_expiry(parser)
    add_duration_option(
        parser,
        "--takeover",
        default="10m",
        env="LINKEDBLOB_GC_TAKEOVER",
        help="how long a blob left deleting by a stopped runner waits before a run finishes it "
        "(at least twice --delete-timeout)",
    )
    add_duration_option(
        parser,
        "--delete-timeout",
        default="30s",
        env="LINKEDBLOB_GC_DELETE_TIMEOUT",
        help="deadline of one delete in blobsvc",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`serve gc`: the server flags (health, metrics, logs), the run's flags, the interval."""
    add_option(parser, "--host", default="127.0.0.1", help="address the health service listens on")
    add_option(parser, "--port", type=int, default=GC_PORT, help="gRPC health port; 0 picks one")
    add_option(
        parser,
        "--metrics-port",
        type=int,
        default=-1,
        help="Prometheus metrics HTTP port; -1 disables, 0 picks a free one",
    )
    add_option(parser, "--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    add_option(parser, "--log-format", default="json", choices=["json", "text"], help="log format")
    add_telemetry_options(parser, access_log=False)
    add_collection(parser)
    add_duration_option(
        parser,
        "--interval",
        default="1h",
        env="LINKEDBLOB_GC_INTERVAL",
        help="time from the end of one run to the start of the next",
    )
