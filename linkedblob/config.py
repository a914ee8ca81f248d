"""Configuration by flags, with every flag's default read from a ``LINKEDBLOB_*`` variable.

``--data DIR`` can be given as ``LINKEDBLOB_DATA=DIR``; a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

ENV_PREFIX = "LINKEDBLOB_"

MiB = 1024 * 1024

# Ports of the three services when run with their defaults.
GATEWAY_PORT = 50051
BLOB_PORT = 50052
LINK_PORT = 50053

# The largest data message a service accepts (larger ones are RESOURCE_EXHAUSTED /
# SIZE_INVALID); the gRPC transport limit sits above it so the reason can be reported.
MAX_CHUNK_BYTES = 4 * MiB
TRANSPORT_LIMIT_BYTES = MAX_CHUNK_BYTES + MiB
# The chunk size used when the services stream bytes: ~1 MiB messages stream fastest.
STREAM_CHUNK_BYTES = MiB


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def parse_bool(value: str) -> bool | None:
    """True or False for the words a boolean variable takes; None for anything else (a typo
    must not silently read as false)."""
    word = value.strip().lower()
    return True if word in _TRUE else False if word in _FALSE else None


_env_bool = parse_bool


def _env_error(parser: argparse.ArgumentParser, message: str) -> None:
    """Records a bad variable against ``parser``: reported (exit 2, one line) only when the
    command that parser belongs to runs, so one server's variable never breaks every command."""
    errors = parser.get_default("env_errors") or []
    parser.set_defaults(env_errors=[*errors, message])


def _checked(convert: Any, env: str) -> Any:
    """``convert`` with a message naming the variable too (a default read from it is parsed by
    argparse only for the command that runs)."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not valid ({exc}; flag or {env})"
            ) from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def add_option(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """Adds ``flag`` with its default taken from LINKEDBLOB_<FLAG> when that is set."""
    env = env_name(flag)
    raw = os.environ.get(env)
    action = kwargs.get("action")
    if action == "store_true":
        if raw is not None:
            value = _env_bool(raw)
            if value is None:
                _env_error(
                    parser, f"{env}={raw!r}: not a boolean (true/false, 1/0, yes/no, on/off)"
                )
            kwargs["default"] = bool(value)
    else:
        if "type" in kwargs:
            kwargs["type"] = _checked(kwargs["type"], env)
        if raw is not None:
            # A string default is parsed by argparse (with ``type``) only when this command runs.
            kwargs["default"] = raw
    help_text = kwargs.get("help", "")
    kwargs["help"] = f"{help_text} [env {env}]".strip()
    parser.add_argument(flag, **kwargs)


def add_server_options(parser: argparse.ArgumentParser, default_port: int) -> None:
    """The options every server shares."""
    add_option(parser, "--host", default="127.0.0.1", help="address to listen on")
    add_option(parser, "--port", type=int, default=default_port, help="port; 0 picks a free one")
    add_option(
        parser,
        "--metrics-port",
        type=int,
        default=-1,
        help="Prometheus metrics HTTP port; -1 disables, 0 picks a free one",
    )
    add_option(
        parser,
        "--grace",
        type=parse_duration,
        default=30.0,
        help="time to drain in-flight calls on SIGTERM (30s, 2m, or seconds)",
    )
    add_option(parser, "--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    add_option(parser, "--log-format", default="json", choices=["json", "text"], help="log format")
    add_telemetry_options(parser)
    add_option(
        parser,
        "--open",
        action="store_true",
        help="start without authentication: anyone who reaches the port may call. Without it, a "
        "server with no authentication configured refuses to start (`linkedblob up` passes it "
        "on loopback)",
    )
    # TLS (linkedblob.tls): the files are re-read when they change.
    add_option(
        parser,
        "--tls-cert",
        default="",
        help="PEM certificate (chain) to serve TLS with; re-read when the file changes",
    )
    add_option(parser, "--tls-key", default="", help="PEM private key of --tls-cert")
    add_option(
        parser,
        "--tls-client-ca",
        default="",
        help="PEM CA bundle: require client certificates it signed (mTLS)",
    )
    from linkedblob.limits import add_limit_options  # limits builds on this module

    # blobsvc and linksvc are called by the gateways, each over one connection that carries
    # all its callers' calls: they allow more streams per connection than the public gateway.
    add_limit_options(parser, internal=default_port != GATEWAY_PORT)


# The port of `linkedblob serve gc` (gRPC health only).
GC_PORT = 50054

_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def add_telemetry_options(parser: argparse.ArgumentParser, access_log: bool = True) -> None:
    """``--access-log`` (the servers) and ``--otel`` (linkedblob.tracing)."""
    if access_log:
        add_option(
            parser,
            "--access-log",
            default="on",
            choices=["on", "off"],
            help="one JSON line per call on the logger linkedblob.access (off: none)",
        )
    add_option(
        parser,
        "--otel",
        action="store_true",
        help="OpenTelemetry tracing over OTLP/gRPC (needs the otel extra; also on when "
        "OTEL_EXPORTER_OTLP_ENDPOINT is set)",
    )


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``10m``, ``24h``, ``7d`` or a plain number of seconds (``90``,
    ``0.5``); a ValueError (argparse: a usage error) otherwise."""
    raw = text.strip().lower()
    unit = _DURATION_UNITS.get(raw[-1:]) if raw else None
    number = raw[:-1] if unit is not None else raw
    try:
        seconds = float(number) * (unit or 1.0)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (e.g. 30s, 10m, 24h, 7d, or seconds)") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"a duration must be a finite number >= 0, not {text!r}")
    return seconds


parse_duration.__name__ = "duration"  # argparse names the type in its usage errors


def add_duration_option(
    parser: argparse.ArgumentParser, flag: str, *, default: str, help: str, env: str = ""
) -> None:
    """A duration flag (:func:`parse_duration`) whose default comes from ``env`` (by default
    LINKEDBLOB_<FLAG>) when that is set. A separate ``env`` keeps apart flags that share a
    name but not a meaning (the collector's ``--grace`` is not the servers' drain time)."""
    env = env or env_name(flag)
    raw = os.environ.get(env)
    parser.add_argument(
        flag,
        type=parse_duration,
        default=raw if raw is not None else default,
        help=f"{help} (30s, 10m, 24h, 7d or seconds; default {default}) [env {env}]",
    )
