"""gRPC calls as the backend adapters make them: errors become LinkedBlobError on the way out.

This is the one place where the gRPC layer's failures become LinkedBlobErrors: a status
(grpc.RpcError) keeps the backend's code and reason (from_rpc_error); a channel this gateway
closed (grpc.aio.UsageError "Channel is closed", as during shutdown) or a failure inside
grpc.aio (grpc.aio.InternalError) is UNAVAILABLE, as a transport failure is.

:func:`answer` makes and awaits a unary call. :class:`WriteCall` is a client stream (blobsvc's
Write) whose failed sends report the status the server ended the call with:

blobsvc ends a Write it refuses (a wrong offset, a full disk) at once, while the gateway may still
be sending. grpc core then fails the gateway's next send, and grpc.aio replaces the status blobsvc
sent with a local INTERNAL "Internal error from Core" when the failed send is handled after the
status arrived (grpc/grpc#36066). So a failed send waits, with a bound, for the call to end and
reports the status blobsvc sent: kept by a done callback when it came first (grpc runs the
callback once, at the first status), else the one awaiting the call gives. Only a call that ends
with none of blobsvc's is the stream broken (UNAVAILABLE: worth a retry).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from linkedblob.errors import LinkedBlobError, Reason, from_rpc_error, unavailable

Response = TypeVar("Response")

# How long a failed send waits, by default, for the status blobsvc ends the call with.
FINAL_STATUS_WAIT = 5.0

# What grpc.aio sets, on its side, when core fails a send (not a status of blobsvc's).
_LOCAL_DETAILS = "Internal error from Core"
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# Failures of grpc.aio that carry no status: a call made or used on a closed channel (UsageError,
# raised as the call is made), or grpc.aio's own failure (InternalError). Neither is a
# grpc.RpcError.
CHANNEL_FAILURES = (grpc.aio.UsageError, grpc.aio.InternalError)
# The failures of a send or of the half-close on a call that has ended.
_SEND_FAILURES = (grpc.RpcError, asyncio.InvalidStateError, *CHANNEL_FAILURES)


def channel_failure(err: BaseException) -> LinkedBlobError:
    """A failure of CHANNEL_FAILURES as the caller sees it: the backend is out of reach."""
    return unavailable(f"backend channel unusable: {err}")


async def answer(method: Callable[..., Awaitable[Response]], *args: Any, **kwargs: Any) -> Response:
    """Makes a unary call (``method(*args, **kwargs)``) and returns its response; a failure, of
    the call or of making it, as a LinkedBlobError."""
    try:
        return await method(*args, **kwargs)
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None
    except CHANNEL_FAILURES as err:
        raise channel_failure(err) from None


class WriteCall:
    """A client-streaming call (serialized messages in) that keeps the status its server sent."""

    __slots__ = ("_call", "_final_status_wait", "_status")

    def __init__(
        self, call: grpc.aio.StreamUnaryCall, final_status_wait: float = FINAL_STATUS_WAIT
    ) -> None:
        """``final_status_wait``: how long a failed send waits for the status the server ends
        the call with (seconds)."""
        self._call = call
        self._final_status_wait = final_status_wait
        self._status: Any = None  # the first status of the server's (cygrpc's AioRpcStatus)
        call.add_done_callback(self._keep_status)

    def _keep_status(self, call: grpc.aio.Call) -> None:
        # Called once, when the call first gets a status. grpc.aio has no synchronous accessor
        # for it; its own __await__ reads this attribute.
        # PRIVATE grpcio API: `_cython_call._status` is an implementation detail of grpc.aio
        # (grpcio 1.85, pinned in constraints.txt). An upgrade may rename or remove it; then
        # this keeps nothing, refused writes answer UNAVAILABLE "stream broken" again, and
        # tests/test_gateway_backend_failures.py's 1,000-attempt test
        # (test_a_send_after_the_server_refused_reports_the_servers_status) fails.
        status = getattr(getattr(call, "_cython_call", None), "_status", None)
        if status is None:
            return
        code = _CODES.get(status.code(), grpc.StatusCode.UNKNOWN)
        if code is not grpc.StatusCode.CANCELLED and not _is_local(code, status.details()):
            self._status = status  # not grpc.aio's stand-in, nor this side's cancel

    async def send(self, raw: bytes) -> None:
        try:
            await self._call.write(raw)
        except _SEND_FAILURES as err:
            raise await self._ended(err) from None

    async def finish(self) -> Any:
        """Half-closes the stream and returns the response."""
        try:
            await self._call.done_writing()
        except _SEND_FAILURES as err:
            raise await self._ended(err) from None
        try:
            return await self._call
        except grpc.RpcError as err:
            raise self._kept_error() or from_rpc_error(err) from None

    def cancel(self) -> None:
        self._call.cancel()

    async def _ended(self, send_error: BaseException) -> LinkedBlobError:
        """What a failed send means: the status the server ended the call with.

        It arrived before the failed send was handled (then grpc.aio's stand-in replaced it, and
        only the done callback saw it), or it arrives after (then awaiting the call gives it).
        """
        final: grpc.RpcError | None = None
        try:
            await asyncio.wait_for(self._call, self._final_status_wait)
        except grpc.RpcError as err:
            final = err
        except (TimeoutError, *CHANNEL_FAILURES):
            pass
        kept = self._kept_error()
        if kept is not None:
            return kept
        if final is not None and not _is_local(final.code(), final.details()):  # type: ignore[attr-defined]
            return from_rpc_error(final)
        if final is None and self._call.done() and not self._call.cancelled():
            return LinkedBlobError(
                grpc.StatusCode.INTERNAL,
                Reason.INTERNAL,
                "blobsvc ended the write before it was sent all of it",
            )
        if isinstance(send_error, CHANNEL_FAILURES):
            return channel_failure(send_error)
        is_rpc_error = isinstance(send_error, grpc.RpcError)
        details = send_error.details() if is_rpc_error else str(send_error)  # type: ignore[attr-defined]
        return unavailable(f"blobsvc stream broken: {details}")

    def _kept_error(self) -> LinkedBlobError | None:
        """The status the done callback kept, as an error; None when it kept none or OK."""
        status = self._status
        code = _CODES.get(status.code(), grpc.StatusCode.UNKNOWN) if status is not None else None
        if code is None or code is grpc.StatusCode.OK:
            return None
        rpc_error = grpc.aio.AioRpcError(
            code,
            grpc.aio.Metadata(),
            grpc.aio.Metadata.from_tuple(tuple(status.trailing_metadata() or ())),
            status.details(),
            status.debug_error_string(),
        )
        return from_rpc_error(rpc_error)


def _is_local(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether a status is grpc.aio's stand-in for a failed send, not one a server sent."""
    return code is grpc.StatusCode.INTERNAL and details == _LOCAL_DETAILS
