"""Client interceptors of the services' backend channels (the gateway's to blobsvc and linksvc,
the collector's): the ``grpc_client_*`` metrics (linkedblob.metrics) and the request id
(linkedblob.requestid) carried to the backend, plus OpenTelemetry's when tracing is on
(linkedblob.tracing).

The grpc.aio ones intercept unary-unary and unary-stream calls only. A client stream (blobsvc's
Write, made by gateway.grpc_blob) is not intercepted: gateway.grpc_calls.WriteCall reads the
status of the very call object grpc.aio made (grpc/grpc#36066), which an intercepted call hides.
gateway.grpc_blob adds the request id to Write's metadata itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import perf_counter
from typing import Any

import grpc

from linkedblob import metrics, requestid

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class _Labels:
    """The metric children of one method, looked up once."""

    __slots__ = ("failed", "grpc_type", "method", "ok", "seconds", "service", "started")

    def __init__(self, full_method: str, grpc_type: str) -> None:
        _, _, rest = full_method.partition("/")
        self.service, _, self.method = rest.partition("/")
        self.grpc_type = grpc_type
        labels = (grpc_type, self.service, self.method)
        self.started = metrics.CLIENT_STARTED.labels(*labels)
        self.seconds = metrics.CLIENT_HANDLING_SECONDS.labels(*labels)
        self.ok = metrics.CLIENT_HANDLED.labels(*labels, "OK")
        self.failed: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode | None, started: float) -> None:
        self.seconds.observe(perf_counter() - started)
        if code is grpc.StatusCode.OK:
            self.ok.inc()
            return
        code = code or grpc.StatusCode.UNKNOWN
        counter = self.failed.get(code)
        if counter is None:
            counter = self.failed[code] = metrics.CLIENT_HANDLED.labels(
                self.grpc_type, self.service, self.method, code.name
            )
        counter.inc()


class _LabelCache(dict[Any, _Labels]):
    def __init__(self, grpc_type: str) -> None:
        super().__init__()
        self.grpc_type = grpc_type

    def __missing__(self, method: Any) -> _Labels:
        name = method.decode() if isinstance(method, bytes) else str(method)
        labels = self[method] = _Labels(name, self.grpc_type)
        return labels


def _with_request_id(details: Any) -> Any:
    rid = requestid.REQUEST_ID.get()
    if not rid:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()), (requestid.KEY, rid))
    return details._replace(metadata=metadata)


def with_request_id(metadata: Any) -> Any:
    """``metadata`` (None, a tuple or grpc.aio.Metadata) with the call's request id added."""
    rid = requestid.REQUEST_ID.get()
    if not rid:
        return metadata
    return (*(metadata or ()), (requestid.KEY, rid))


class AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self._labels = _LabelCache("unary")

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        labels = self._labels[details.method]
        labels.started.inc()
        started = perf_counter()
        code: grpc.StatusCode | None = grpc.StatusCode.UNKNOWN
        try:
            call = await continuation(_with_request_id(details), request)
            await call
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            labels.handled(code, started)
        return call


class AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self) -> None:
        self._labels = _LabelCache("server_stream")

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        labels = self._labels[details.method]
        labels.started.inc()
        started = perf_counter()
        call = await continuation(_with_request_id(details), request)
        loop = asyncio.get_running_loop()

        async def record(done: Any) -> None:
            try:
                code = await done.code()
            except Exception:
                code = grpc.StatusCode.UNKNOWN
            labels.handled(code, started)

        call.add_done_callback(lambda done: loop.create_task(record(done)))
        return call


class _SyncMetrics(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """The blocking channels' (the collector's): metrics and request id."""

    def __init__(self) -> None:
        self._unary = _LabelCache("unary")
        self._stream = _LabelCache("server_stream")

    @staticmethod
    def _details(details: Any) -> Any:
        rid = requestid.REQUEST_ID.get()
        if not rid:
            return details
        return _Details(
            details.method,
            details.timeout,
            (*(details.metadata or ()), (requestid.KEY, rid)),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def _intercept(self, cache: _LabelCache, continuation: Any, details: Any, request: Any) -> Any:
        labels = cache[details.method]
        labels.started.inc()
        started = perf_counter()
        call = continuation(self._details(details), request)
        call.add_done_callback(lambda done: labels.handled(done.code(), started))
        return call

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._intercept(self._unary, continuation, details, request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._intercept(self._stream, continuation, details, request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, *values: Any) -> None:
        (
            self.method,
            self.timeout,
            self.metadata,
            self.credentials,
            self.wait_for_ready,
            self.compression,
        ) = values


def aio_backend_interceptors() -> list[Any]:
    """The interceptors of a grpc.aio backend channel: metrics and request id, tracing first
    when it is on."""
    from linkedblob import tracing

    return [*tracing.aio_client_interceptors(), AioUnaryUnary(), AioUnaryStream()]


def backend_channel(channel: grpc.Channel) -> grpc.Channel:
    """A blocking backend channel (the collector's) with the metrics and the request id, and
    tracing when it is on."""
    from linkedblob import tracing

    return grpc.intercept_channel(channel, *tracing.client_interceptors(), _SyncMetrics())
