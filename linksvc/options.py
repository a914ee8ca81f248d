"""Flags of `linkedblob serve link`."""

from __future__ import annotations

import argparse

from linkedblob.config import LINK_PORT, add_option, parse_duration
from linkedblob.peers import add_peer_options

HELP = "the metadata plane: links, blob index, upload sessions (linkedblob.link.v1.LinkService)"
DEFAULT_PORT = LINK_PORT
# Upload sessions open at once in one repository (each is a row, and a staging area in blobsvc).
DEFAULT_MAX_SESSIONS_PER_REPOSITORY = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_peer_options(parser)
    add_option(
        parser,
        "--db",
        default="sqlite:///data/linkedblob.db",
        help="SQLAlchemy URL: sqlite:///PATH or postgresql+psycopg://USER@HOST/DB",
    )
    add_option(
        parser,
        "--migrate",
        action="store_true",
        help="upgrade the database to the latest schema before serving",
    )
    add_option(
        parser,
        "--db-pool-size",
        type=int,
        default=8,
        help="database connections (and the threads that run SQL on them)",
    )
    add_option(
        parser,
        "--db-busy-timeout",
        type=parse_duration,
        default=5.0,
        help="SQLite: how long a writer waits for the database lock before answering UNAVAILABLE",
    )
    add_option(
        parser,
        "--sqlite-threads-only",
        action="store_true",
        help="SQLite: run every call in the SQL threads; by default the short ones run on the "
        "event loop, which is cheaper than the hop to a thread",
    )
    add_option(
        parser,
        "--max-sessions-per-repository",
        type=int,
        default=DEFAULT_MAX_SESSIONS_PER_REPOSITORY,
        help="most upload sessions open (active) in one repository; CreateSession answers "
        "RESOURCE_EXHAUSTED / TOO_MANY_REQUESTS beyond it (a session ends when committed, "
        "cancelled, or purged by the collector after the upload expiry); 0: no limit",
    )
