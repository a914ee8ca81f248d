"""The servicer side of every service: the one decorator every servicer method wears.

:func:`servicer_method`, in one wrapper (it runs on every call, so one layer, not three):

- turns what the method raises into a gRPC status, once, at the service's edge: a
  LinkedBlobError keeps its code and reason; a protobuf DecodeError (a servicer parsing raw
  bytes of a byte stream) is INVALID_ARGUMENT / REQUEST_MALFORMED, logged as one rate-limited
  warning line; anything else is INTERNAL with a generic message (no internal ids, no exception
  text) and is logged with its traceback. That includes a grpc.RpcError: no servicer makes gRPC
  calls itself (the gateway's backend adapters turn their calls' failures into LinkedBlobError,
  see gateway.grpc_calls), so one reaching here is a leak, to be seen, not relayed.
- refuses a :class:`Refusal` put in place of the request (a malformed request message, see
  linkedblob.server.method_handlers; a limit, see gateway.limits) inside the call, so the
  status, the metrics and the access log see it like any other answer;
- counts calls by method and final code, times them, and keeps the in-flight count the
  bootstrap uses to see when the server is quiet (metrics.ACTIVITY);
- writes the access log line: logger ``linkedblob.access`` at INFO, one line per call with the
  method, code, reason, duration, peer and the caller identity (linkedblob.caller). Raise that
  logger's level to turn it off; nothing of it is computed then.

It works on async unary and client-streaming methods and on async-generator (server-streaming)
ones.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable
from time import perf_counter
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from linkedblob import metrics
from linkedblob.caller import caller
from linkedblob.errors import LinkedBlobError, Reason, invalid_argument

log = logging.getLogger(__name__)
access_log = logging.getLogger("linkedblob.access")

F = TypeVar("F", bound=Callable[..., Any])

# At most one warning line about malformed requests per this many seconds (a flood of garbage
# must not become a flood of log lines); the line counts the ones it stands for.
MALFORMED_LOG_INTERVAL = 10.0


class _RateLimitedWarning:
    """One warning line per ``interval`` at most, saying how many occurrences it covers."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = 0.0
        self._suppressed = 0
        self._lock = threading.Lock()  # the deserializers may run off the event loop

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return
            self._next = now + self.interval
            suppressed, self._suppressed = self._suppressed, 0
        log.warning(
            message + " (%d more not logged in the last %.0fs)",
            *args,
            suppressed,
            self.interval,
        )


_malformed_log = _RateLimitedWarning(MALFORMED_LOG_INTERVAL)


def malformed_request(method: str) -> LinkedBlobError:
    """INVALID_ARGUMENT / REQUEST_MALFORMED for bytes that are not a message of ``method``'s
    type; logs one rate-limited warning line (no traceback: it is the caller's fault)."""
    _malformed_log.warn("malformed protobuf request to %s", method)
    return invalid_argument(
        Reason.REQUEST_MALFORMED, f"the request is not a valid protobuf message for {method}"
    )


class Refusal:
    """Stands in for a request that is refused before the servicer method sees it: ``make``
    builds the error, which :func:`servicer_method` raises inside the call."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], LinkedBlobError]) -> None:
        self.make = make


def to_linkedblob_error(method: str, exc: BaseException) -> LinkedBlobError:
    """What a failure of ``method`` answers: itself if a LinkedBlobError, REQUEST_MALFORMED
    for a DecodeError, else INTERNAL (logged with its traceback)."""
    if isinstance(exc, LinkedBlobError):
        return exc
    if isinstance(exc, DecodeError):
        return malformed_request(method)
    log.error("unexpected error in %s", method, exc_info=exc)
    return LinkedBlobError(grpc.StatusCode.INTERNAL, Reason.INTERNAL, "internal error")


def log_access(
    method: str, code: grpc.StatusCode, reason: str, started: float, context: Any
) -> None:
    """The access log line of one call (also written by linkedblob.peers for the calls it
    refuses before they reach the servicer)."""
    seconds = perf_counter() - started
    try:
        peer = context.peer()
    except Exception:  # a context without a peer (tests' fakes)
        peer = ""
    who = caller()
    access_log.info(
        "%s %s %s %.1fms peer=%s caller=%s",
        method,
        code.name,
        reason or "-",
        seconds * 1000,
        peer,
        who or "-",
        extra={
            "method": method,
            "code": code.name,
            "reason": reason,
            "seconds": round(seconds, 6),
            "peer": peer,
            "caller": who,
        },
    )


def servicer_method(method: F) -> F:
    """How every servicer method is wrapped: errors mapped to a status once, the call counted
    and timed, and its access log line written (see the module's docstring)."""
    name = method.__name__
    # The metric children of this method, looked up once: a labels() lookup per call costs as
    # much as the rest of the wrapper (a lock and a dict of label tuples).
    seconds = metrics.RPC_SECONDS.labels(name)
    ok_calls = metrics.RPCS.labels(name, grpc.StatusCode.OK.name)
    failed_calls: dict[grpc.StatusCode, Any] = {}
    activity = metrics.ACTIVITY
    info = logging.INFO

    def finish(started: float, code: grpc.StatusCode, reason: str, context: Any) -> None:
        activity.in_flight -= 1
        calls: Any
        if code is grpc.StatusCode.OK:
            calls = ok_calls
        else:
            calls = failed_calls.get(code)
            if calls is None:
                calls = failed_calls[code] = metrics.RPCS.labels(name, code.name)
        calls.inc()
        seconds.observe(perf_counter() - started)
        if access_log.isEnabledFor(info):
            log_access(name, code, reason, started, context)

    def aborted_code(context: Any, exc: BaseException) -> grpc.StatusCode:
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            return grpc.StatusCode.CANCELLED  # the caller went away (mid-stream: the close)
        return context.code() or grpc.StatusCode.UNKNOWN

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> Any:
            started = perf_counter()
            activity.started += 1
            activity.in_flight += 1
            code, reason = grpc.StatusCode.UNKNOWN, ""
            try:
                try:
                    if type(request) is Refusal:
                        raise request.make()
                    async for item in method(self, request, context):
                        yield item
                    code = grpc.StatusCode.OK
                except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit) as exc:
                    code = aborted_code(context, exc)
                    raise
                except Exception as exc:
                    err = to_linkedblob_error(name, exc)
                    code, reason = err.code, err.reason
                    await context.abort_with_status(err.to_status())
            finally:
                finish(started, code, reason, context)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        started = perf_counter()
        activity.started += 1
        activity.in_flight += 1
        code, reason = grpc.StatusCode.UNKNOWN, ""
        try:
            try:
                if type(request) is Refusal:
                    raise request.make()
                result = await method(self, request, context)
                code = grpc.StatusCode.OK
                return result
            except (grpc.aio.AbortError, asyncio.CancelledError) as exc:
                code = aborted_code(context, exc)
                raise
            except Exception as exc:
                err = to_linkedblob_error(name, exc)
                code, reason = err.code, err.reason
                await context.abort_with_status(err.to_status())
        finally:
            finish(started, code, reason, context)

    return unary_wrapper  # type: ignore[return-value]
