"""`linkedblob serve link`: opens the database, checks (or, with --migrate, upgrades) its schema,
and runs the LinkService on the shared bootstrap (health, reflection, metrics, graceful
shutdown)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable

import grpc
import sqlalchemy as sa

from linkedblob import peers, tls
from linkedblob.limits import ServerLimits
from linkedblob.link.v1 import link_pb2
from linkedblob.server import Service, add_handlers, method_handlers, run
from linksvc import migrate, roles
from linksvc.database import Database, safe_url
from linksvc.queries import DriverQuery
from linksvc.servicer import SERVICE_NAME, LinkServicer

log = logging.getLogger(__name__)

# Readiness: the database answers a query that reads the schema (not just the connection:
# SQLite's SELECT 1 would not touch the file), on the SQL threads the calls use.
_READY_QUERY = DriverQuery("SELECT count(*) FROM alembic_version", None)


def database_answers(db: Database) -> Callable[[], Awaitable[None]]:
    """linksvc's readiness check (linkedblob.health.Check)."""

    async def check() -> None:
        await db.run(db.fetch_one, _READY_QUERY, {})

    return check


def serve(args: argparse.Namespace) -> int | None:
    try:
        credentials = tls.server_credentials_from_args(args)
        authorizer = peers.authorizer_from_args(args, roles.TABLE)
    except ValueError as exc:
        tls.exit_with("link", exc)
    shown = safe_url(args.db)
    try:
        if args.migrate:
            # In a child process: alembic stays out of the server's memory.
            failure = migrate.upgrade_in_child(args.db)
            if failure is not None:
                print(f"linkedblob link: cannot open {shown}: {failure}", file=sys.stderr)
                return 1
            log.info("migrated %s to head", shown)
        db = Database(
            args.db,
            pool_size=args.db_pool_size,
            busy_timeout=args.db_busy_timeout,
            sqlite_on_loop=not args.sqlite_threads_only,
        )
    except (ValueError, sa.exc.ArgumentError, sa.exc.DBAPIError) as exc:
        print(f"linkedblob link: cannot open {shown}: {exc}", file=sys.stderr)
        return 1
    try:
        with db.engine.connect() as conn:
            status = migrate.schema_status(conn)
    except sa.exc.DBAPIError as exc:
        db.close()
        print(f"linkedblob link: cannot open {shown}: {exc}", file=sys.stderr)
        return 1
    if not status.at_head:
        db.close()
        print(
            f"linkedblob link: refusing to serve {shown}: {status.describe()}.\n"
            f"Run `linkedblob migrate --db {shown}` first (or serve with --migrate).",
            file=sys.stderr,
        )
        return 1

    servicer = LinkServicer(db, args.max_sessions_per_repository)

    # Built as blobsvc's and the gateway's are, so a malformed request answers
    # INVALID_ARGUMENT / REQUEST_MALFORMED (linkedblob.server.method_handlers).
    handlers = method_handlers(link_pb2.DESCRIPTOR.services_by_name["LinkService"], servicer)

    def register(server: grpc.aio.Server) -> None:
        add_handlers(server, SERVICE_NAME, handlers)

    async def on_stop() -> None:
        await asyncio.to_thread(db.close)

    run(
        Service(
            "link",
            [SERVICE_NAME],
            register,
            on_stop=on_stop,
            secured=authorizer is not None,
            credentials=credentials,
            interceptors=[authorizer] if authorizer else [],
            limits=ServerLimits.from_args(args),
            readiness=database_answers(db),
        ),
        args.host,
        args.port,
        args.grace,
        args.metrics_port,
        open_=args.open,
    )
    return 0
