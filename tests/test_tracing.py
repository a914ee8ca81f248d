"""OpenTelemetry tracing (the otel extra): the three services export their spans over OTLP to a
small real OTLP/gRPC receiver started here, and one call's trace spans the gateway, linksvc and
blobsvc."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)

from linkedblob import tracing
from linkedblob.v1 import registry_pb2 as pb
from tests.telemetry import TelemetryStack, log_lines, telemetry_stack, wait_for


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps (service name, span name, trace id hex, kind) of every
    span exported to it."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str, int]] = []
        self._lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append((service, span.name, span.trace_id.hex(), span.kind))
        return trace_service_pb2.ExportTraceServiceResponse()

    def seen(self) -> list[tuple[str, str, str, int]]:
        with self._lock:
            return list(self.spans)


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


@pytest.fixture(scope="module")
def stack(
    receiver: tuple[Receiver, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TelemetryStack]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver[1]}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with telemetry_stack(tmp_path_factory.mktemp("tracing"), env=env) as running:
        yield running


def test_one_trace_spans_the_gateway_and_both_backends(
    stack: TelemetryStack, receiver: tuple[Receiver, int]
) -> None:
    spans = receiver[0]
    stack.stub().PutBlob(
        pb.PutBlobRequest(repository="trace/me", data=b"traced"),
        metadata=(("x-request-id", "traced-1"),),
    )
    [line] = wait_for(
        lambda: [x for x in log_lines(stack.gateway) if x["request_id"] == "traced-1"], "line"
    )
    trace_id = line["trace_id"]
    assert len(trace_id) == 32

    def in_trace() -> list[Any]:
        found = {(s[0], s[1]) for s in spans.seen() if s[2] == trace_id}
        services = {service for service, _ in found}
        wanted = {"linkedblob-gateway", "linkedblob-blobsvc", "linkedblob-linksvc"}
        return [found] if wanted <= services else []

    [found] = wait_for(in_trace, "spans of the three services in one trace", timeout=15)
    assert ("linkedblob-gateway", "/linkedblob.v1.Registry/PutBlob") in found
    assert ("linkedblob-blobsvc", "/linkedblob.blob.v1.BlobService/Put") in found
    # The gateway's client span of the same call, parent of blobsvc's server span.
    assert (
        sum(1 for s in found if s == ("linkedblob-gateway", "/linkedblob.blob.v1.BlobService/Put"))
        == 1
    )
    backend_lines = [x for x in log_lines(stack.blob) if x["request_id"] == "traced-1"]
    assert backend_lines and backend_lines[0]["trace_id"] == trace_id


def test_tracing_is_off_by_default_and_wanted_by_flag_or_endpoint() -> None:
    assert not tracing.wanted(False, {})
    assert tracing.wanted(True, {})
    assert tracing.wanted(False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert not tracing.wanted(True, {"OTEL_SDK_DISABLED": "true"})
    assert tracing.server_interceptors() == [] and tracing.aio_client_interceptors() == []
