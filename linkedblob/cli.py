"""The one command line: ``linkedblob serve blob|link|gateway|gc``, ``up``, ``migrate``, the
client commands (push, pull, stat, mount, ls, rm, ...) and the collector's (gc, fsck).

Each service package owns its flags (``<pkg>.options``: DEFAULT_PORT, add_arguments) and its
entry (``<pkg>.server.serve(args)``); this module only dispatches, importing a service's server
only when that service is run, so client commands start quickly.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Sequence

from linkedblob import tracing
from linkedblob.config import add_option, add_server_options
from linkedblob.logs import setup_logging
from linkedblob.tuning import tune_malloc

SERVICES = {"blob": "blobsvc", "link": "linksvc", "gateway": "gateway", "gc": "collector"}


def _serve(args: argparse.Namespace) -> int | None:
    tune_malloc()
    setup_logging(args.log_level, args.log_format, getattr(args, "access_log", "on") == "on")
    tracing.configure(SERVICES[args.service], getattr(args, "otel", False))
    server = importlib.import_module(f"{SERVICES[args.service]}.server")
    return server.serve(args)  # type: ignore[no-any-return]


def _migrate(args: argparse.Namespace) -> int | None:
    from linksvc.migrate import upgrade

    upgrade(args.db)
    print(f"migrated {args.db} to head")
    return 0


def _version() -> str:
    """The installed distribution's version (a checkout that is not installed says so)."""
    try:
        return importlib.metadata.version("linkedblob")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linkedblob", description="A content-addressed blob store for registry-like systems."
    )
    parser.add_argument("--version", action="version", version=f"linkedblob {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run one service")
    kinds = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")
    for kind, package in SERVICES.items():
        options = importlib.import_module(f"{package}.options")
        sub = kinds.add_parser(kind, help=options.HELP)
        if not getattr(options, "OWN_SERVER_OPTIONS", False):
            add_server_options(sub, options.DEFAULT_PORT)
        options.add_arguments(sub)
        sub.set_defaults(handler=_serve)

    migrate = commands.add_parser("migrate", help="upgrade a link database to the latest schema")
    add_option(
        migrate,
        "--db",
        required=False,
        default="sqlite:///data/linkedblob.db",
        help="SQLAlchemy URL of the link database",
    )
    migrate.set_defaults(handler=_migrate)

    from collector import commands as gc_commands
    from linkedblob import commands as client_commands
    from linkedblob import up

    up.register(commands)
    client_commands.register(commands)
    gc_commands.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    for message in getattr(args, "env_errors", None) or ():
        parser.exit(2, f"linkedblob: {message}\n")
    result = args.handler(args)
    sys.exit(result or 0)


if __name__ == "__main__":
    main()
