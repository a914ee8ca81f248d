"""Malformed protobuf on every method of the three services: INVALID_ARGUMENT /
REQUEST_MALFORMED, one rate-limited warning line and no traceback in the server's log, and the
service still answers. Also the access log line (method, code, reason, peer, caller)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor

from linkedblob.blob.v1 import blob_pb2
from linkedblob.errors import Reason, error_info
from linkedblob.link.v1 import link_pb2
from linkedblob.v1 import registry_pb2, registry_pb2_grpc
from tests.services import ServiceProcess
from tests.stack import Stack

# Not a protobuf message: field 31, wire type 7 (no such wire type), then a truncated varint.
GARBAGE = b"\xff\xff\xff"

SERVICES = {
    "blob": blob_pb2.DESCRIPTOR.services_by_name["BlobService"],
    "link": link_pb2.DESCRIPTOR.services_by_name["LinkService"],
    "gateway": registry_pb2.DESCRIPTOR.services_by_name["Registry"],
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("malformed")
    started = Stack.start(data, f"sqlite:///{data / 'link.db'}", direct=False)
    try:
        yield started
    finally:
        started.stop()


def _call(
    channel: grpc.Channel, method: descriptor.MethodDescriptor, messages: list[bytes]
) -> None:
    """Calls ``method`` with raw bytes (identity serializers), reading the whole answer."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    call = kind(path, request_serializer=None, response_deserializer=None)  # type: ignore[operator]
    request: object = iter(messages) if method.client_streaming else messages[0]
    answer = call(request, timeout=10)
    if method.server_streaming:
        list(answer)


def _expect_malformed(
    channel: grpc.Channel, method: descriptor.MethodDescriptor, messages: list[bytes]
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _call(channel, method, messages)
    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.name, err.details())  # type: ignore[attr-defined]
    info = error_info(err)
    assert info is not None and info.reason == Reason.REQUEST_MALFORMED, (method.name, info)


def _service(stack: Stack, kind: str) -> ServiceProcess:
    return {"blob": stack.blob, "link": stack.link, "gateway": stack.gateway}[kind]


def _no_traceback(svc: ServiceProcess) -> None:
    text = "".join(svc.output)
    assert "Traceback" not in text, text[-3000:]
    assert '"level": "error"' not in text, text[-3000:]


@pytest.mark.parametrize("kind", list(SERVICES))
def test_garbage_to_every_method_is_request_malformed(stack: Stack, kind: str) -> None:
    svc = _service(stack, kind)
    with svc.channel() as channel:
        for _ in range(3):  # several rounds: the warning is not written per call
            for method in SERVICES[kind].methods:
                _expect_malformed(channel, method, [GARBAGE])
    _no_traceback(svc)
    warnings = [line for line in svc.output if "malformed protobuf request" in line]
    # One line per 10 s at most (the test's rounds take far less than 20 s).
    assert 1 <= len(warnings) <= 2, warnings


def test_a_malformed_later_message_of_a_push_is_request_malformed(stack: Stack) -> None:
    """The byte streams' later messages are parsed by the servicers (raw requests): a bad one
    is REQUEST_MALFORMED too, and the staging area of the push is aborted."""
    method = SERVICES["gateway"].methods_by_name["PushBlob"]
    header = registry_pb2.PushBlobRequest(
        header=registry_pb2.PushBlobRequest.Header(repository="malformed/push")
    ).SerializeToString()
    data = registry_pb2.PushBlobRequest(data=b"x" * 100).SerializeToString()
    with stack.gateway.channel() as channel:
        _expect_malformed(channel, method, [header, data, b"\x12\x05abc"])  # 5 bytes said, 3 sent
    write = SERVICES["gateway"].methods_by_name["WriteUpload"]
    with stack.gateway.channel() as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        upload = stub.StartUpload(registry_pb2.StartUploadRequest(repository="malformed/push"))
        first = registry_pb2.WriteUploadRequest(
            repository="malformed/push", upload_id=upload.id, data=b"abc"
        ).SerializeToString()
        _expect_malformed(channel, write, [first, GARBAGE])
    _no_traceback(stack.gateway)
    staging = stack.data / "blobs" / "uploads"
    deadline = time.monotonic() + 10
    while staging.exists() and any(p.name.startswith("push-") for p in staging.iterdir()):
        assert time.monotonic() < deadline, list(staging.iterdir())
        time.sleep(0.1)


@pytest.mark.parametrize("kind", list(SERVICES))
def test_the_service_still_answers_after_garbage(stack: Stack, kind: str) -> None:
    svc = _service(stack, kind)
    with svc.channel() as channel:
        for method in SERVICES[kind].methods:
            with pytest.raises(grpc.RpcError):
                _call(channel, method, [GARBAGE])
        health = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=None,
            response_deserializer=None,
        )
        assert health(b"", timeout=10) == b"\x08\x01"  # SERVING
    with stack.gateway.channel() as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        put = stub.PutBlob(registry_pb2.PutBlobRequest(repository="malformed/ok", data=b"fine"))
        assert put.size == 4


def test_access_log_names_method_code_reason_peer_and_caller(tmp_path: Path) -> None:
    from tests.services import running

    with running("blob", "--data", str(tmp_path / "blobs"), "--log-level", "INFO") as blob:
        with blob.channel() as channel:
            _expect_malformed(channel, SERVICES["blob"].methods_by_name["Stat"], [GARBAGE])
        deadline = time.monotonic() + 10
        while True:
            lines = [
                json.loads(line)
                for line in blob.output
                if '"logger": "linkedblob.access"' in line and '"Stat"' in line
            ]
            if lines or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert lines, "".join(blob.output)
    line = lines[0]
    assert line["method"] == "Stat"
    assert line["code"] == "INVALID_ARGUMENT"
    assert line["reason"] == "REQUEST_MALFORMED"
    assert line["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
    assert line["caller"] == ""  # an open service authenticates no one
    assert line["seconds"] >= 0
    assert "caller=-" in line["msg"]
