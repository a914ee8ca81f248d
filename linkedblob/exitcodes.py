"""The CLI's exit statuses, and the one place that turns an error into a status and a line.

Every command exits with one of these (README, "Exit codes"); a failed call exits with the
status of its gRPC code's class, so a script can tell "not there" from "try again" from "not
allowed" without parsing the message:

====  ==============  ==========================================================================
code  name            when
====  ==============  ==========================================================================
0     OK              done (fsck: clean; gc: ran, or skipped because another runner holds it)
1     FAILURE         anything else: INTERNAL, UNKNOWN, UNIMPLEMENTED, CANCELLED, a local I/O
                      error; fsck found damage, a gc run failed
2     USAGE           a bad flag, variable or file argument (missing, unreadable TLS files), a
                      port already in use, the ``[server]`` extra not installed
3     NOT_FOUND       NOT_FOUND: no such blob, link, upload or repository
4     INVALID         INVALID_ARGUMENT, OUT_OF_RANGE: the request itself is wrong (a bad digest,
                      name or range)
5     CONFLICT        ALREADY_EXISTS, FAILED_PRECONDITION: the state does not allow it (deletes
                      disabled, an upload already committed)
6     DENIED          UNAUTHENTICATED, PERMISSION_DENIED
7     EXHAUSTED       RESOURCE_EXHAUSTED: a limit or the storage is full
8     RETRY           UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED: transient; the same command may
                      succeed later (the codes the client library retries)
9     DATA_LOSS       DATA_LOSS: bytes that do not hash to their digest
130   INTERRUPTED     Ctrl-C (SIGINT), quietly
====  ==============  ==========================================================================

Codes stay below 64 (sysexits) and far from 126-128+N (the shell's), so they never read as a
signal. The mapping is by status class, not by ErrorInfo reason: the line on stderr carries the
reason (``NOT_FOUND BLOB_UNKNOWN: ...``).

:func:`report` is what ``linkedblob.cli.main`` calls around every command: a command lets a
StatusError (LinkedBlobError, ClientError), a grpc.RpcError, an OSError or a :class:`UsageError`
propagate and gets a one-line message and the right status, never a traceback. Anything else is
a bug and keeps its traceback (status 1).
"""

from __future__ import annotations

import sys
from typing import TextIO

import grpc

OK = 0
FAILURE = 1
USAGE = 2
NOT_FOUND = 3
INVALID = 4
CONFLICT = 5
DENIED = 6
EXHAUSTED = 7
RETRY = 8
DATA_LOSS = 9
INTERRUPTED = 130

_S = grpc.StatusCode
BY_STATUS: dict[grpc.StatusCode, int] = {
    _S.OK: OK,
    _S.NOT_FOUND: NOT_FOUND,
    _S.INVALID_ARGUMENT: INVALID,
    _S.OUT_OF_RANGE: INVALID,
    _S.ALREADY_EXISTS: CONFLICT,
    _S.FAILED_PRECONDITION: CONFLICT,
    _S.UNAUTHENTICATED: DENIED,
    _S.PERMISSION_DENIED: DENIED,
    _S.RESOURCE_EXHAUSTED: EXHAUSTED,
    _S.UNAVAILABLE: RETRY,
    _S.DEADLINE_EXCEEDED: RETRY,
    _S.ABORTED: RETRY,
    _S.DATA_LOSS: DATA_LOSS,
}

# Top-level modules only the services use (the ``[server]`` extra): a command that needs one
# without it says how to install it.
SERVER_MODULES = frozenset(
    {
        "sqlalchemy",
        "alembic",
        "psycopg",
        "uvloop",
        "jwt",
        "cryptography",
        "prometheus_client",
        "grpc_reflection",
        "grpc_health",
    }
)
SERVER_EXTRA_HINT = "needs the server dependencies: pip install 'linkedblob[server]'"


class UsageError(Exception):
    """A command line the command cannot act on (exit status 2, the message on one line)."""


def for_status(code: grpc.StatusCode) -> int:
    """The exit status of a call that failed with ``code``."""
    return BY_STATUS.get(code, FAILURE)


def missing_server_module(exc: BaseException) -> str | None:
    """The server-only module whose absence raised ``exc``, if that is what it is."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".", 1)[0]
        if top in SERVER_MODULES:
            return top
    return None


def classify(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, one-line message) for an error a user can cause; None for a bug."""
    from linkedblob.errors import StatusError, error_info

    if isinstance(exc, StatusError):
        reason = f" {exc.reason}" if exc.reason else ""
        return for_status(exc.code), f"{exc.code.name}{reason}: {exc.message}"
    if isinstance(exc, grpc.RpcError):
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        info = error_info(exc)
        reason = f" {info.reason}" if info is not None and info.reason else ""
        return for_status(code), f"{code.name}{reason}: {exc.details()}"  # type: ignore[attr-defined]
    if isinstance(exc, UsageError):
        return USAGE, str(exc)
    if (module := missing_server_module(exc)) is not None:
        return USAGE, f"{SERVER_EXTRA_HINT} (no module {module!r})"
    if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return USAGE, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
    if isinstance(exc, OSError):
        return FAILURE, f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc)
    return None


def report(command: str, exc: BaseException, stderr: TextIO | None = None) -> int:
    """Writes ``linkedblob COMMAND: message`` (and the error's notes, indented) to stderr and
    returns the exit status; re-raises what is not a user's error (a bug keeps its traceback)."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    found = classify(exc)
    if found is None:
        raise exc
    status, message = found
    out = stderr or sys.stderr
    print(f"linkedblob {command}: {message}", file=out)
    for note in getattr(exc, "__notes__", ()):
        print(f"  {note}", file=out)
    return status
