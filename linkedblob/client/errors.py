"""The client's errors: every failed call raises :class:`ClientError`, which reads like the
services' own errors (a :class:`linkedblob.errors.StatusError`: code, ErrorInfo reason, message,
metadata)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from linkedblob.errors import StatusError, error_info

# Errors after which a resumable push re-reads the offset and goes on, and a call worth
# retrying is retried (see linkedblob.client.retry).
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED}
)


class ClientError(StatusError):
    """A failed call: the gRPC code, the ErrorInfo reason (empty if none), the message and the
    ErrorInfo metadata. When it comes from a call, the grpc.RpcError is its ``__cause__``."""

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> ClientError:
        code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
        message: str = err.details() or ""  # type: ignore[attr-defined]
        info = error_info(err)
        if info is None:
            return cls(code, "", message)
        return cls(code, info.reason, message, dict(info.metadata))


class DigestMismatchError(ClientError):
    """Received or sent bytes that do not hash to the expected digest."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.DATA_LOSS, "DIGEST_INVALID", message)


@contextlib.contextmanager
def rpc_errors() -> Iterator[None]:
    """Turns a grpc.RpcError raised inside into a ClientError."""
    try:
        yield
    except grpc.RpcError as err:
        raise ClientError.from_rpc_error(err) from err


def is_transient(e: ClientError) -> bool:
    """Whether a call that failed with ``e`` is worth making again as it was."""
    return e.code in RETRYABLE


def is_deleting(e: ClientError) -> bool:
    """The blob is being deleted by garbage collection (ABORTED / BLOB_DELETING): the same push,
    put or commit goes through once the deletion has finished (the bytes are sent again)."""
    return e.code == grpc.StatusCode.ABORTED and e.reason == "BLOB_DELETING"


def is_lease_expired(e: ClientError) -> bool:
    """A push or put whose lease expired before its link (ABORTED / BLOB_UPLOAD_INVALID): its
    bytes may be gone; pushing them again succeeds."""
    return e.code == grpc.StatusCode.ABORTED and e.reason == "BLOB_UPLOAD_INVALID"


def must_push_again(e: ClientError) -> bool:
    """Whether a push or put that failed with ``e`` succeeds when its bytes are sent again."""
    return is_deleting(e) or is_lease_expired(e)


def is_resumable(e: ClientError) -> bool:
    """Whether a resumable upload's write that failed with ``e`` can go on from the offset the
    gateway reports."""
    if e.code in RETRYABLE:
        return True
    # A write at a stale offset (a chunk the gateway got before the connection broke).
    return e.code == grpc.StatusCode.OUT_OF_RANGE and e.reason == "BLOB_UPLOAD_INVALID"
