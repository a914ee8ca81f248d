"""OpenTelemetry tracing: off unless asked for, and then spans for every call served and every
backend call made, so that one trace runs from the gateway into blobsvc and linksvc.

Turned on by ``--otel`` (``LINKEDBLOB_OTEL=true``) or by the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` variables; spans go to
that OTLP/gRPC endpoint (default http://localhost:4317), configured by the standard ``OTEL_*``
variables (``OTEL_SDK_DISABLED=true`` turns it off again). It needs the ``otel`` extra
(``pip install 'linkedblob[otel]'``). Nothing of OpenTelemetry is imported while it is off: the
interceptor lists below are then empty.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class _State:
    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = False


STATE = _State()


def wanted(flag: bool, environ: Any = os.environ) -> bool:
    """Whether tracing is asked for: the flag or an OTLP endpoint variable, unless the SDK is
    disabled by OTEL_SDK_DISABLED."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return flag or any(environ.get(name) for name in _ENDPOINT_VARIABLES)


def configure(service_name: str, flag: bool = False) -> bool:
    """Sets up the tracer provider and its OTLP exporter when tracing is wanted; returns whether
    it is on. Exits 2 (a configuration error) with one line when the ``otel`` extra is missing."""
    if not wanted(flag):
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        print(
            f"linkedblob {service_name}: tracing needs the otel extra "
            f"(pip install 'linkedblob[otel]'): {exc}",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    attributes = {
        "service.name": os.environ.get("OTEL_SERVICE_NAME") or f"linkedblob-{service_name}"
    }
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    STATE.on = True
    log.info("tracing on: spans exported over OTLP/gRPC")
    return True


def server_interceptors() -> list[Any]:
    """The grpc.aio server interceptor that opens a span per call (none while tracing is off)."""
    if not STATE.on:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]


def aio_client_interceptors() -> list[Any]:
    """grpc.aio client interceptors that open a span per backend call and pass the trace on;
    unary-unary and unary-stream only (see linkedblob.interceptors for why)."""
    if not STATE.on:
        return []
    import grpc
    from opentelemetry.instrumentation.grpc import aio_client_interceptors as made

    kinds = (grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor)
    return [i for i in made() if isinstance(i, kinds)]


def client_interceptors() -> list[Any]:
    """The blocking channels' tracing interceptor (none while tracing is off)."""
    if not STATE.on:
        return []
    from opentelemetry.instrumentation.grpc import client_interceptor

    return [client_interceptor()]


def trace_id() -> str:
    """The current span's trace id (32 hex digits), "" without one or while tracing is off."""
    if not STATE.on:
        return ""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else ""
