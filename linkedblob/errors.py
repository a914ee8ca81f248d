"""The error model: canonical gRPC codes plus a google.rpc.ErrorInfo detail.

Domain logic raises :class:`LinkedBlobError`; the servicer decorator
(:func:`linkedblob.rpc.servicer_method`) turns it into a gRPC status whose ErrorInfo ``reason``
mirrors the OCI distribution error codes, so a client can branch on it (and grpcurl shows it).
Clients read it back with :func:`error_info`; the table of codes and reasons is in
docs/design.md.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "linkedblob.dev"


class Reason(enum.StrEnum):
    DIGEST_INVALID = "DIGEST_INVALID"
    SIZE_INVALID = "SIZE_INVALID"
    NAME_INVALID = "NAME_INVALID"
    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    BLOB_UPLOAD_UNKNOWN = "BLOB_UPLOAD_UNKNOWN"
    BLOB_UPLOAD_INVALID = "BLOB_UPLOAD_INVALID"
    # Not an OCI code: the blob is being deleted by garbage collection (ABORTED: retry, and
    # the upload goes through once the deletion has finished).
    BLOB_DELETING = "BLOB_DELETING"
    RANGE_INVALID = "RANGE_INVALID"
    PAGINATION_INVALID = "PAGINATION_INVALID"
    UNSUPPORTED = "UNSUPPORTED"
    UNAUTHORIZED = "UNAUTHORIZED"
    DENIED = "DENIED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    # RESOURCE_EXHAUSTED: a limit that protects everyone from one caller (streams per
    # connection, open uploads, session creation rate); the ErrorInfo metadata ``limit`` names
    # it. OCI's TOOMANYREQUESTS.
    TOO_MANY_REQUESTS = "TOO_MANY_REQUESTS"
    # RESOURCE_EXHAUSTED: a stream sent nothing for the idle timeout and was ended.
    STREAM_IDLE = "STREAM_IDLE"
    # RESOURCE_EXHAUSTED: the storage has no space left.
    STORAGE_FULL = "STORAGE_FULL"
    # INVALID_ARGUMENT: a request that is not a valid protobuf message of the method's type.
    REQUEST_MALFORMED = "REQUEST_MALFORMED"


class StatusError(Exception):
    """A failed call as linkedblob describes one: a gRPC code, the ErrorInfo reason (empty when
    there is none), a message and the ErrorInfo metadata. The base of the services' own
    LinkedBlobError and of the client library's ClientError, so both read the same."""

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

    def __str__(self) -> str:
        return f"{self.code.name}/{self.reason or '-'}: {self.message}"


class LinkedBlobError(StatusError):
    """A failure raised by a service's own code; the servicer turns it into a gRPC status."""

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


__all__ = [
    "DOMAIN",
    "LinkedBlobError",
    "Reason",
    "StatusError",
    "aborted",
    "error_info",
    "failed_precondition",
    "from_rpc_error",
    "invalid_argument",
    "not_found",
    "out_of_range",
    "resource_exhausted",
    "unavailable",
]
