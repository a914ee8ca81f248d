"""The error model: canonical gRPC codes plus a google.rpc.ErrorInfo detail.

Domain logic raises :class:`LinkedBlobError`; the servicer decorators turn it into a gRPC
status whose ErrorInfo ``reason`` mirrors the OCI distribution error codes, so a client can
branch on it (and grpcurl shows it). Clients read it back with :func:`error_info`.
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from time import perf_counter
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from linkedblob import metrics

DOMAIN = "linkedblob.dev"

log = logging.getLogger(__name__)


class Reason(enum.StrEnum):
    DIGEST_INVALID = "DIGEST_INVALID"
    SIZE_INVALID = "SIZE_INVALID"
    NAME_INVALID = "NAME_INVALID"
    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    BLOB_UPLOAD_UNKNOWN = "BLOB_UPLOAD_UNKNOWN"
    BLOB_UPLOAD_INVALID = "BLOB_UPLOAD_INVALID"
    RANGE_INVALID = "RANGE_INVALID"
    PAGINATION_INVALID = "PAGINATION_INVALID"
    UNSUPPORTED = "UNSUPPORTED"
    UNAUTHORIZED = "UNAUTHORIZED"
    DENIED = "DENIED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class LinkedBlobError(Exception):
    """A failure with a gRPC code, a machine-readable reason and optional metadata."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: Reason | str,
        message: str,
        metadata: Mapping[str, str | int] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = str(reason)
        self.message = message
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}

    def to_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=DOMAIN, metadata=self.metadata
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        return rpc_status.to_status(
            status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])
        )

    def __repr__(self) -> str:
        return f"LinkedBlobError({self.code.name}, {self.reason}, {self.message!r})"


def invalid_argument(reason: Reason, message: str, **metadata: str | int) -> LinkedBlobError:
    return LinkedBlobError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, metadata)


def not_found(reason: Reason, message: str, **metadata: str | int) -> LinkedBlobError:
    return LinkedBlobError(grpc.StatusCode.NOT_FOUND, reason, message, metadata)


def out_of_range(reason: Reason, message: str, **metadata: str | int) -> LinkedBlobError:
    return LinkedBlobError(grpc.StatusCode.OUT_OF_RANGE, reason, message, metadata)


def failed_precondition(reason: Reason, message: str, **metadata: str | int) -> LinkedBlobError:
    return LinkedBlobError(grpc.StatusCode.FAILED_PRECONDITION, reason, message, metadata)


def aborted(reason: Reason, message: str, **metadata: str | int) -> LinkedBlobError:
    return LinkedBlobError(grpc.StatusCode.ABORTED, reason, message, metadata)


def unavailable(message: str, **metadata: str | int) -> LinkedBlobError:
    return LinkedBlobError(grpc.StatusCode.UNAVAILABLE, Reason.UNAVAILABLE, message, metadata)


def resource_exhausted(reason: Reason, message: str, **metadata: str | int) -> LinkedBlobError:
    return LinkedBlobError(grpc.StatusCode.RESOURCE_EXHAUSTED, reason, message, metadata)


# --- reading errors back (clients, and the gateway relaying a backend's error) ---------------


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a failed call, or None when it has none."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def from_rpc_error(err: grpc.RpcError) -> LinkedBlobError:
    """Turns a backend's failed call back into a LinkedBlobError, keeping code and reason.

    Transport failures of a backend (it is down, or the call timed out) become UNAVAILABLE so
    the caller of the gateway knows to retry.
    """
    code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
    details: str = err.details() or ""  # type: ignore[attr-defined]
    info = error_info(err)
    if info is not None:
        return LinkedBlobError(code, info.reason, details, dict(info.metadata))
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return unavailable(f"backend unavailable: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return resource_exhausted(Reason.SIZE_INVALID, details)
    return LinkedBlobError(code, Reason.INTERNAL, details)


# --- servicer side ----------------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def _to_error(method: str, exc: BaseException) -> LinkedBlobError:
    if isinstance(exc, LinkedBlobError):
        return exc
    if isinstance(exc, grpc.RpcError):
        return from_rpc_error(exc)
    log.exception("unexpected error in %s", method, exc_info=exc)
    return LinkedBlobError(
        grpc.StatusCode.INTERNAL, Reason.INTERNAL, f"internal error: {type(exc).__name__}"
    )


def grpc_errors(method: F) -> F:
    """Wraps a servicer method: maps errors to a gRPC status and records call metrics.

    LinkedBlobError keeps its code and reason; a backend's grpc.RpcError is relayed with its
    code and reason; anything else becomes INTERNAL and is logged with its traceback. Works on
    async unary and client-streaming methods and on async-generator (server-streaming) ones.
    """
    name = method.__name__
    # The metric children of this method, looked up once: a labels() lookup per call costs as
    # much as the rest of the wrapper (a lock and a dict of label tuples).
    seconds = metrics.RPC_SECONDS.labels(name)
    ok_calls = metrics.RPCS.labels(name, grpc.StatusCode.OK.name)
    failed_calls: dict[grpc.StatusCode, Any] = {}
    activity = metrics.ACTIVITY

    def observe_ok(started: float) -> None:
        ok_calls.inc()
        seconds.observe(perf_counter() - started)

    def observe(started: float, code: grpc.StatusCode) -> None:
        calls = failed_calls.get(code)
        if calls is None:
            calls = failed_calls[code] = metrics.RPCS.labels(name, code.name)
        calls.inc()
        seconds.observe(perf_counter() - started)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> Any:
            started = perf_counter()
            activity.started += 1
            activity.in_flight += 1
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                observe(started, context.code() or grpc.StatusCode.UNKNOWN)
                raise
            except Exception as exc:
                err = _to_error(name, exc)
                observe(started, err.code)
                await context.abort_with_status(err.to_status())
            else:
                observe_ok(started)
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
        except grpc.aio.AbortError:
            observe(started, context.code() or grpc.StatusCode.UNKNOWN)
            raise
        except Exception as exc:
            err = _to_error(name, exc)
            observe(started, err.code)
            await context.abort_with_status(err.to_status())
        finally:
            activity.in_flight -= 1
        observe_ok(started)
        return result

    return unary_wrapper  # type: ignore[return-value]


__all__ = [
    "DOMAIN",
    "LinkedBlobError",
    "Reason",
    "aborted",
    "error_info",
    "failed_precondition",
    "from_rpc_error",
    "grpc_errors",
    "invalid_argument",
    "not_found",
    "out_of_range",
    "resource_exhausted",
    "unavailable",
]
