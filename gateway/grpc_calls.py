"""gRPC calls as the backend adapters make them: errors become LinkedBlobError on the way out.

:func:`answer` awaits a unary call. :class:`WriteCall` is a client stream (blobsvc's Write)
whose failed sends report the status the server ended the call with:

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
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc

from linkedblob.errors import LinkedBlobError, Reason, from_rpc_error, unavailable

Response = TypeVar("Response")

# How long a failed send waits for the status blobsvc ends the call with.
FINAL_STATUS_WAIT = 5.0

# What grpc.aio sets, on its side, when core fails a send (not a status of blobsvc's).
_LOCAL_DETAILS = "Internal error from Core"
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# The failures of a send or of the half-close on a call that has ended.
_SEND_FAILURES = (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.InternalError)


async def answer(call: Awaitable[Response]) -> Response:
    """The response of a unary call; its failure as a LinkedBlobError."""
    try:
        return await call
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


class WriteCall:
    """A client-streaming call (serialized messages in) that keeps the status its server sent."""

    __slots__ = ("_call", "_status")

    def __init__(self, call: grpc.aio.StreamUnaryCall) -> None:
        self._call = call
        self._status: Any = None  # the first status of the server's (cygrpc's AioRpcStatus)
        call.add_done_callback(self._keep_status)

    def _keep_status(self, call: grpc.aio.Call) -> None:
        # Called once, when the call first gets a status. grpc.aio has no synchronous accessor
        # for it; its own __await__ reads this attribute.
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
            await asyncio.wait_for(self._call, FINAL_STATUS_WAIT)
        except grpc.RpcError as err:
            final = err
        except TimeoutError:
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
