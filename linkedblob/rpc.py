"""The servicer side of every service: one decorator per concern, and their composition.

- :func:`maps_errors` turns what a servicer method raises into a gRPC status, once, at the
  service's edge: a LinkedBlobError keeps its code and reason; anything else becomes INTERNAL
  and is logged with its traceback. That includes a grpc.RpcError: no servicer makes gRPC calls
  itself (the gateway's backend adapters turn their calls' failures into LinkedBlobError, see
  gateway.grpc_calls), so one reaching here is a leak, to be seen, not relayed.
- :func:`records_metrics` counts calls by method and final code, times them, and keeps the
  in-flight count the bootstrap uses to see when the server is quiet.
- :func:`servicer_method` is both, the way every servicer method is wrapped.

Each works on async unary and client-streaming methods and on async-generator
(server-streaming) ones.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from time import perf_counter
from typing import Any, TypeVar

import grpc

from linkedblob import metrics
from linkedblob.errors import LinkedBlobError, Reason

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def to_linkedblob_error(method: str, exc: BaseException) -> LinkedBlobError:
    """What a failure of ``method`` answers: itself if a LinkedBlobError, else INTERNAL."""
    if isinstance(exc, LinkedBlobError):
        return exc
    log.exception("unexpected error in %s", method, exc_info=exc)
    return LinkedBlobError(
        grpc.StatusCode.INTERNAL, Reason.INTERNAL, f"internal error: {type(exc).__name__}"
    )


def maps_errors(method: F) -> F:
    """Ends a failed call with the status of :func:`to_linkedblob_error`."""
    name = method.__name__

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> Any:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await context.abort_with_status(to_linkedblob_error(name, exc).to_status())

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort_with_status(to_linkedblob_error(name, exc).to_status())

    return unary_wrapper  # type: ignore[return-value]


def records_metrics(method: F) -> F:
    """Counts the call by method and final code, observes its latency, and keeps
    metrics.ACTIVITY. Sits outside :func:`maps_errors`, so it sees the code the call ends with."""
    name = method.__name__
    # The metric children of this method, looked up once: a labels() lookup per call costs as
    # much as the rest of the wrapper (a lock and a dict of label tuples).
    seconds = metrics.RPC_SECONDS.labels(name)
    ok_calls = metrics.RPCS.labels(name, grpc.StatusCode.OK.name)
    failed_calls: dict[grpc.StatusCode, Any] = {}
    activity = metrics.ACTIVITY

    def observe(started: float, code: grpc.StatusCode) -> None:
        calls: Any
        if code is grpc.StatusCode.OK:
            calls = ok_calls
        else:
            calls = failed_calls.get(code)
            if calls is None:
                calls = failed_calls[code] = metrics.RPCS.labels(name, code.name)
        calls.inc()
        seconds.observe(perf_counter() - started)

    def final_code(context: Any, exc: BaseException) -> grpc.StatusCode:
        if isinstance(exc, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED  # the caller went away
        return context.code() or grpc.StatusCode.UNKNOWN

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> Any:
            started = perf_counter()
            activity.started += 1
            activity.in_flight += 1
            try:
                async for item in method(self, request, context):
                    yield item
            except BaseException as exc:
                observe(started, final_code(context, exc))
                raise
            else:
                observe(started, grpc.StatusCode.OK)
            finally:
                activity.in_flight -= 1

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        started = perf_counter()
        activity.started += 1
        activity.in_flight += 1
        try:
            result = await method(self, request, context)
        except BaseException as exc:
            observe(started, final_code(context, exc))
            raise
        finally:
            activity.in_flight -= 1
        observe(started, grpc.StatusCode.OK)
        return result

    return unary_wrapper  # type: ignore[return-value]


def servicer_method(method: F) -> F:
    """How every servicer method is wrapped: errors mapped to a status, the call recorded."""
    return records_metrics(maps_errors(method))
