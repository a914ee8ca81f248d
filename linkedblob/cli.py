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
import importlib.util
import sys
from collections.abc import Sequence

from linkedblob import exitcodes, tracing
from linkedblob.config import add_option, add_server_options
from linkedblob.logs import setup_logging
from linkedblob.tuning import tune_malloc

SERVICES = {"blob": "blobsvc", "link": "linksvc", "gateway": "gateway", "gc": "collector"}


# Commands that run services or call their internal APIs (they need the ``[server]`` extra;
# the client commands do not).
_SERVER_COMMANDS = frozenset({"serve", "up", "migrate", "gc", "fsck"})


def _require_server_extra() -> None:
    """Raises ModuleNotFoundError (reported as "pip install 'linkedblob[server]'", exit 2) when
    a module of the ``[server]`` extra is not installed: before any service starts, not from
    a child process half-way through ``up``."""
    for module in sorted(exitcodes.SERVER_MODULES):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def _serve(args: argparse.Namespace) -> int | None:
    # The CLI opts in to the process-wide malloc tuning the library leaves alone by default.
    tune_malloc()
    setup_logging(args.log_level, args.log_format, getattr(args, "access_log", "on") == "on")
    tracing.configure(SERVICES[args.service], getattr(args, "otel", False))
    server = importlib.import_module(f"{SERVICES[args.service]}.server")
    return server.serve(args)  # type: ignore[no-any-return]


def _migrate(args: argparse.Namespace) -> int | None:
    import sqlalchemy as sa

    from linksvc.database import safe_url
    from linksvc.migrate import upgrade

    try:
        shown = safe_url(args.db)
    except sa.exc.ArgumentError as exc:
        raise exitcodes.UsageError(f"--db: {exc}") from exc
    try:
        upgrade(args.db)
    except (ValueError, sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        raise exitcodes.UsageError(f"--db {shown}: {exc}") from exc
    except sa.exc.DBAPIError as exc:  # the database refused or could not be reached
        first = str(exc.orig or exc).strip().splitlines()[0]
        print(f"linkedblob migrate: cannot open {shown}: {first}", file=sys.stderr)
        return exitcodes.FAILURE
    print(f"migrated {shown} to head")
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


def _command_name(args: argparse.Namespace) -> str:
    service = getattr(args, "service", None)
    return f"{args.command} {service}" if args.command == "serve" and service else args.command


def main(argv: Sequence[str] | None = None) -> None:
    """Runs one command and exits with its status (linkedblob.exitcodes): an error a user can
    cause (a failed call, a missing file, a bad setting) is one line on stderr and the status of
    its class, never a traceback; Ctrl-C exits 130 quietly."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        for message in getattr(args, "env_errors", None) or ():
            parser.exit(exitcodes.USAGE, f"linkedblob: {message}\n")
        try:
            if args.command in _SERVER_COMMANDS:
                _require_server_extra()
            result = args.handler(args)
        except Exception as exc:
            result = exitcodes.report(_command_name(args), exc)
    except KeyboardInterrupt:
        result = exitcodes.INTERRUPTED
    sys.exit(result or 0)


if __name__ == "__main__":
    main()
