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
- counts calls under the standard gRPC names (grpc_server_started_total, _handled_total by
  code, _handling_seconds, and on streams _msg_received_total / _msg_sent_total: see
  linkedblob.metrics), with the metric children of each method looked up once, and keeps the
  in-flight count the bootstrap uses to see when the server is quiet (metrics.ACTIVITY);
- takes the call's request id from its metadata (``x-request-id``; at the gateway, made when
  missing and returned in the trailing metadata: linkedblob.requestid);
- writes the access log line: logger ``linkedblob.access`` at INFO, one JSON line per call with
  the service, method, repository and digest (of a request message with such fields), code,
  reason, duration, bytes of a byte stream in and out, peer, request id and the caller identity
  (linkedblob.caller), and the trace id when tracing is on. ``--access-log off`` (or that
  logger's level raised) turns it off; nothing of it is computed then.

It works on async unary and client-streaming methods and on async-generator (server-streaming)
ones.
"""

from __future__ import annotations

import asyncio
import contextvars
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

from linkedblob import metrics, requestid, tracing
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


_GRPC_TYPES = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}


def grpc_type(client_streaming: bool, server_streaming: bool) -> str:
    """The ``grpc_type`` label of a method of these streaming kinds."""
    return _GRPC_TYPES[(client_streaming, server_streaming)]


class MethodTelemetry:
    """One servicer method's metric children (linkedblob.metrics), looked up once: a labels()
    lookup per call costs as much as the rest of the wrapper (a lock and a dict of label
    tuples). Bound to the full service name by :func:`describe` when the server registers the
    method; a method called without that (a test calling the servicer directly) binds with an
    empty service name on its first call."""

    __slots__ = (
        "failed",
        "grpc_type",
        "method",
        "ok",
        "received",
        "seconds",
        "sent",
        "service",
        "started",
        "streams_in",
        "uploading",
    )

    def __init__(self, method: str, grpc_type: str) -> None:
        self.method = method
        self.grpc_type = grpc_type
        self.service = ""
        self.started: Any = None
        self.seconds: Any = None
        self.ok: Any = None
        self.failed: dict[grpc.StatusCode, Any] = {}
        self.received: Any = None
        self.sent: Any = None
        self.streams_in = False
        self.uploading: Any = None

    def bind(self, service: str, kind: str | None = None) -> None:
        self.service = service
        self.grpc_type = kind or self.grpc_type
        labels = (self.grpc_type, service, self.method)
        self.started = metrics.SERVER_STARTED.labels(*labels)
        self.seconds = metrics.SERVER_HANDLING_SECONDS.labels(*labels)
        self.ok = metrics.SERVER_HANDLED.labels(*labels, "OK")
        self.failed = {}
        self.streams_in = self.grpc_type in ("client_stream", "bidi_stream")
        self.uploading = (
            metrics.UPLOADS_IN_PROGRESS.labels(service, self.method) if self.streams_in else None
        )
        streams = self.grpc_type != "unary"
        # Messages are counted on streams only: a unary call is one each way, which
        # grpc_server_handled_total already counts (two fewer increments per unary call).
        self.received = metrics.SERVER_MSG_RECEIVED.labels(*labels) if streams else None
        self.sent = metrics.SERVER_MSG_SENT.labels(*labels) if streams else None

    def handled(self, code: grpc.StatusCode) -> Any:
        if code is grpc.StatusCode.OK:
            return self.ok
        counter = self.failed.get(code)
        if counter is None:
            counter = self.failed[code] = metrics.SERVER_HANDLED.labels(
                self.grpc_type, self.service, self.method, code.name
            )
        return counter


def describe(behaviour: Any, service: str, kind: str) -> None:
    """Tells a servicer method wrapped by :func:`servicer_method` its full service name and
    ``grpc_type`` (linkedblob.server.method_handlers does, as it registers the method)."""
    telemetry = getattr(getattr(behaviour, "__func__", behaviour), "telemetry", None)
    if isinstance(telemetry, MethodTelemetry):
        telemetry.bind(service, kind)


class _Streamed:
    """Messages and bytes of a client stream, counted as the servicer reads them."""

    __slots__ = ("messages", "size")

    def __init__(self) -> None:
        self.messages = 0
        self.size = 0


async def _counting(requests: Any, counts: _Streamed) -> Any:
    async for request in requests:
        counts.messages += 1
        if type(request) is bytes:  # a raw request stream (the byte streams): its size is free
            counts.size += len(request)
        yield request


# What a streamed call's servicer noted of its first message for the access line (note()).
_NOTED: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar(
    "linkedblob_access_noted", default=("", "")
)


def note(repository: str = "", digest: str = "") -> None:
    """Names the repository and digest of the call in progress in its access line: for the
    streams, whose messages the wrapper does not parse (a unary request's fields are read)."""
    _NOTED.set((repository, digest))


def _access_fields(request: Any) -> tuple[str, str]:
    """The repository and digest a request names (a message with such fields, or what the
    servicer noted), else ""."""
    repository = getattr(request, "repository", "")
    digest = getattr(request, "digest", "")
    if not (repository or digest):
        return _NOTED.get()
    return (
        repository if isinstance(repository, str) else "",
        digest if isinstance(digest, str) else "",
    )


def peer_of(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:  # a context without a peer (tests' fakes)
        return ""


def log_access(
    method: str,
    code: grpc.StatusCode,
    reason: str,
    started: float,
    context: Any,
    *,
    service: str = "",
    request: Any = None,
    bytes_in: int = 0,
    bytes_out: int = 0,
    peer: str | None = None,
    seconds: float | None = None,
) -> None:
    """The access log line of one call (also written by linkedblob.peers for the calls it
    refuses before they reach the servicer). ``peer`` and ``seconds``, when given, stand for
    ``context``'s and the time since ``started`` (a line written after the call ended)."""
    if seconds is None:
        seconds = perf_counter() - started
    if peer is None:
        peer = peer_of(context)
    who = caller()
    rid = requestid.REQUEST_ID.get()
    repository, digest = _access_fields(request)
    fields: dict[str, Any] = {
        "service": service,
        "method": method,
        "repository": repository,
        "digest": digest,
        "code": code.name,
        "reason": reason,
        "seconds": round(seconds, 6),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "peer": peer,
        "request_id": rid,
        "caller": who,
    }
    if tracing.STATE.on:
        fields["trace_id"] = tracing.trace_id()
    access_log.info(
        "%s %s %s %.1fms peer=%s caller=%s request_id=%s",
        method,
        code.name,
        reason or "-",
        seconds * 1000,
        peer,
        who or "-",
        rid or "-",
        extra=fields,
    )


def _edge_request_id(context: Any, rid: str) -> str:
    """At the edge (the gateway): the caller's valid id or a new one, set for the call and
    returned in the trailing metadata."""
    rid = rid or requestid.new()
    requestid.REQUEST_ID.set(rid)
    # In the trailers, sent with the status: initial metadata of its own is one more send per
    # call, which cost ~0.1 ms of a 0.5 ms StatBlob (bench/README.md, issue 12).
    context.set_trailing_metadata(((requestid.KEY, rid),))
    return rid


async def _abort(context: Any, err: LinkedBlobError, edge_rid: str) -> None:
    """Ends the call with ``err``'s status, keeping the edge's request id in the trailers (a
    status carries trailing metadata of its own, its details, which would replace it)."""
    status = err.to_status()
    metadata = tuple(status.trailing_metadata)
    if edge_rid:
        metadata = (*metadata, (requestid.KEY, edge_rid))
    await context.abort(status.code, status.details, metadata)


def servicer_method(method: F) -> F:
    """How every servicer method is wrapped: errors mapped to a status once, the call counted
    and timed, and its access log line written (see the module's docstring)."""
    name = method.__name__
    streams_out = inspect.isasyncgenfunction(method)
    telemetry = MethodTelemetry(name, "server_stream" if streams_out else "unary")
    activity = metrics.ACTIVITY
    info = logging.INFO
    role = requestid.ROLE
    incoming = requestid.incoming
    request_id = requestid.REQUEST_ID

    def begin(context: Any) -> str:
        """Counts the call's start; its request id (from its metadata: "" without one)."""
        if telemetry.started is None:
            telemetry.bind("")
        telemetry.started.inc()
        activity.started += 1
        activity.in_flight += 1
        rid = incoming(context.invocation_metadata())
        if rid:
            request_id.set(rid)
        return rid

    def finish(
        started: float,
        code: grpc.StatusCode,
        reason: str,
        context: Any,
        request: Any,
        streamed: _Streamed | None,
        sent: int,
        sent_bytes: int,
    ) -> None:
        activity.in_flight -= 1
        telemetry.handled(code).inc()
        telemetry.seconds.observe(perf_counter() - started)
        if telemetry.received is not None:  # a stream: its messages (a unary request is one)
            received = streamed.messages if streamed is not None else 1
            if received:
                telemetry.received.inc(received)
        if sent:
            telemetry.sent.inc(sent)
        if access_log.isEnabledFor(info):
            # Written once the answer is on its way, not before: a line costs ~25 us of CPU,
            # which a StatBlob (~0.5 ms) waited for (+0.09 ms p50 in the bench). call_soon
            # runs it in a copy of this call's context (request id, caller, span).
            asyncio.get_running_loop().call_soon(
                functools.partial(
                    log_access,
                    name,
                    code,
                    reason,
                    started,
                    None,
                    service=telemetry.service,
                    request=request,
                    bytes_in=streamed.size if streamed is not None else 0,
                    bytes_out=sent_bytes,
                    peer=peer_of(context),
                    seconds=perf_counter() - started,
                )
            )

    def aborted_code(context: Any, exc: BaseException) -> grpc.StatusCode:
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            return grpc.StatusCode.CANCELLED  # the caller went away (mid-stream: the close)
        return context.code() or grpc.StatusCode.UNKNOWN

    if streams_out:

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> Any:
            started = perf_counter()
            rid = begin(context)
            t = telemetry
            code, reason = grpc.StatusCode.UNKNOWN, ""
            streamed = None
            sent = sent_bytes = 0
            edge_rid = ""
            try:
                try:
                    if role.edge:
                        edge_rid = _edge_request_id(context, rid)
                    if type(request) is Refusal:
                        raise request.make()
                    if t.streams_in:
                        streamed = _Streamed()
                        request = _counting(request, streamed)
                    async for item in method(self, request, context):
                        sent += 1
                        if type(item) is bytes:  # raw responses: the size is free
                            sent_bytes += len(item)
                        yield item
                    code = grpc.StatusCode.OK
                except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit) as exc:
                    code = aborted_code(context, exc)
                    raise
                except Exception as exc:
                    err = to_linkedblob_error(name, exc)
                    code, reason = err.code, err.reason
                    await _abort(context, err, edge_rid)
            finally:
                finish(started, code, reason, context, request, streamed, sent, sent_bytes)

        stream_wrapper.telemetry = telemetry  # type: ignore[attr-defined]
        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        started = perf_counter()
        rid = begin(context)
        t = telemetry
        code, reason = grpc.StatusCode.UNKNOWN, ""
        streamed = None
        edge_rid = ""
        try:
            try:
                if role.edge:
                    edge_rid = _edge_request_id(context, rid)
                if type(request) is Refusal:
                    raise request.make()
                if t.streams_in:
                    streamed = _Streamed()
                    request = _counting(request, streamed)
                    t.uploading.inc()
                    try:
                        result = await method(self, request, context)
                    finally:
                        t.uploading.dec()
                else:
                    result = await method(self, request, context)
                code = grpc.StatusCode.OK
                return result
            except (grpc.aio.AbortError, asyncio.CancelledError) as exc:
                code = aborted_code(context, exc)
                raise
            except Exception as exc:
                err = to_linkedblob_error(name, exc)
                code, reason = err.code, err.reason
                await _abort(context, err, edge_rid)
        finally:
            sent = 1 if t.sent is not None and code is grpc.StatusCode.OK else 0
            finish(started, code, reason, context, request, streamed, sent, 0)

    unary_wrapper.telemetry = telemetry  # type: ignore[attr-defined]
    return unary_wrapper  # type: ignore[return-value]
