"""linkedblob.rpc at a real in-process gRPC server: the access log line names the caller the
service authenticated; an unexpected exception is INTERNAL with a generic message and is
logged with its traceback; malformed requests are logged once per interval, not per call."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest

from linkedblob import rpc
from linkedblob.blob.v1 import blob_pb2
from linkedblob.caller import set_caller
from linkedblob.errors import Reason, error_info
from linkedblob.server import add_handlers, method_handlers

SERVICE = blob_pb2.DESCRIPTOR.services_by_name["BlobService"]


class _Servicer:
    @rpc.servicer_method
    async def Stat(self, request: blob_pb2.StatRequest, context: Any) -> blob_pb2.StatResponse:
        set_caller("spiffe://test/alice")
        return blob_pb2.StatResponse()

    @rpc.servicer_method
    async def UploadStatus(
        self, request: blob_pb2.UploadStatusRequest, context: Any
    ) -> blob_pb2.UploadStatusResponse:
        raise RuntimeError("session 0123456789abcdef is broken")

    def __getattr__(self, name: str) -> Any:
        async def unused(request: Any, context: Any) -> Any:
            raise NotImplementedError

        return unused


async def _serve_and_call(calls: int) -> tuple[list[grpc.aio.AioRpcError | Any], list[Any]]:
    server = grpc.aio.server()
    add_handlers(server, SERVICE.full_name, method_handlers(SERVICE, _Servicer()))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stat = channel.unary_unary(
                f"/{SERVICE.full_name}/Stat",
                request_serializer=None,
                response_deserializer=None,
            )
            status = channel.unary_unary(
                f"/{SERVICE.full_name}/UploadStatus",
                request_serializer=None,
                response_deserializer=None,
            )
            ok = [await stat(b"")]
            failures: list[Any] = []
            try:
                await status(b"")
            except grpc.aio.AioRpcError as err:
                failures.append(err)
            for _ in range(calls):
                try:
                    await stat(b"\xff\xff\xff")
                except grpc.aio.AioRpcError as err:
                    failures.append(err)
            return ok, failures
    finally:
        await server.stop(None)


def test_access_log_internal_errors_and_malformed_requests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    ok, failures = asyncio.run(_serve_and_call(calls=20))
    assert ok == [b""]
    internal, *malformed = failures
    assert internal.code() == grpc.StatusCode.INTERNAL
    assert internal.details() == "internal error"  # no exception text, no ids
    assert error_info(internal).reason == Reason.INTERNAL  # type: ignore[union-attr]
    assert len(malformed) == 20
    for err in malformed:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(err).reason == Reason.REQUEST_MALFORMED  # type: ignore[union-attr]

    access = [r for r in caplog.records if r.name == "linkedblob.access"]
    assert len(access) == 22  # one per call
    first = access[0]
    assert (first.method, first.code, first.reason) == ("Stat", "OK", "")  # type: ignore[attr-defined]
    assert first.caller == "spiffe://test/alice"  # type: ignore[attr-defined]
    assert first.peer.startswith("ipv4:127.0.0.1:")  # type: ignore[attr-defined]
    assert "caller=spiffe://test/alice" in first.getMessage()
    assert (access[1].code, access[1].reason, access[1].caller) == (  # type: ignore[attr-defined]
        "INTERNAL",
        "INTERNAL",
        "",  # each call has its own caller: the first one's does not leak into the next
    )
    assert access[2].reason == "REQUEST_MALFORMED"  # type: ignore[attr-defined]

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None  # the unexpected one, traced
    warnings = [r for r in caplog.records if "malformed protobuf" in r.getMessage()]
    assert len(warnings) <= 1  # 20 malformed calls, at most one line (one may be earlier)
    assert all(r.exc_info is None for r in warnings)


def test_the_access_log_is_off_with_its_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    logging.getLogger("linkedblob.access").setLevel(logging.WARNING)
    try:
        asyncio.run(_serve_and_call(calls=1))
    finally:
        logging.getLogger("linkedblob.access").setLevel(logging.NOTSET)
    assert not [r for r in caplog.records if r.name == "linkedblob.access"]
