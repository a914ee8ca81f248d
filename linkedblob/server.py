"""The bootstrap every service uses: a grpc.aio server with health checking (liveness and
readiness: linkedblob.health), reflection, metrics, message limits, keepalive and graceful
shutdown on SIGTERM/SIGINT.

A service supplies a :class:`Service` (its registrar and its full service names) and an
optional async cleanup; :func:`run` does the rest and prints one ready line on stdout,
``linkedblob <name> listening on HOST:PORT``, which `linkedblob up` and the tests wait for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor, message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2_grpc

from linkedblob import metrics, reflection, tracing
from linkedblob.config import TRANSPORT_LIMIT_BYTES
from linkedblob.health import Check, Readiness
from linkedblob.limits import ServerLimits
from linkedblob.rpc import Refusal, describe, grpc_type, malformed_request
from linkedblob.tuning import release_free_memory

log = logging.getLogger(__name__)

# grpcio-health-checking's asyncio servicer (the typing stubs don't know the `aio` submodule).
AioHealthServicer = health.aio.HealthServicer  # type: ignore[attr-defined]


def server_options(
    max_message_bytes: int = TRANSPORT_LIMIT_BYTES, limits: ServerLimits | None = None
) -> list[tuple[str, int]]:
    """The gRPC options of every server: message limits, keepalive, and the connection limits
    (streams per connection, idle and old connections: linkedblob.limits)."""
    return [
        *(limits or ServerLimits()).options(),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Detect dead peers on long-lived streams, and allow clients' keepalive pings.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # A second server on the same port must fail, not silently share it.
        ("grpc.so_reuseport", 0),
    ]


_HANDLER_FACTORIES: dict[tuple[bool, bool], Any] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handlers(
    service: descriptor.ServiceDescriptor,
    servicer: object,
    raw_requests: frozenset[str] = frozenset(),
    raw_responses: frozenset[str] = frozenset(),
) -> dict[str, grpc.RpcMethodHandler]:
    """A service's handlers as the generated add_*Servicer_to_server builds them, except that
    the methods named in ``raw_requests`` get their requests unparsed (bytes) and those in
    ``raw_responses`` send what the servicer yields as already serialized (see linkedblob.wire).

    A request that does not parse is not an error of gRPC's (which would answer UNKNOWN, or
    INTERNAL on a stream, and log a traceback): the deserializer hands a :class:`Refusal`
    instead, which the servicer method (linkedblob.rpc.servicer_method) answers with
    INVALID_ARGUMENT / REQUEST_MALFORMED. Raw requests are parsed by the servicers, whose
    DecodeError linkedblob.rpc maps the same way.
    """
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_class: Any = message_factory.GetMessageClass(method.input_type)
        response_class: Any = message_factory.GetMessageClass(method.output_type)
        factory = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        behaviour = getattr(servicer, method.name)
        describe(
            behaviour,
            service.full_name,
            grpc_type(method.client_streaming, method.server_streaming),
        )
        raw = method.name in raw_requests
        if method.client_streaming and not raw:
            behaviour = _refusing_streamed(behaviour, method.server_streaming)
        handlers[method.name] = factory(
            behaviour,
            request_deserializer=None
            if raw
            else _tolerant_parser(request_class.FromString, method.name),
            response_serializer=None
            if method.name in raw_responses
            else response_class.SerializeToString,
        )
    return handlers


def _tolerant_parser(parse: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    """``parse``, answering a Refusal (REQUEST_MALFORMED) for bytes that do not parse."""
    refusal = Refusal(lambda: malformed_request(method))

    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError:
            return refusal

    return deserialize


def _refusing_streamed(behaviour: Any, server_streaming: bool) -> Any:
    """A client-streaming ``behaviour`` whose request stream raises the error of a Refusal in
    it (a streamed message that did not parse), inside the servicer method."""

    async def refusing(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            if type(request) is Refusal:
                raise request.make()
            yield request

    if server_streaming:

        async def stream_stream(request_iterator: Any, context: Any) -> AsyncIterator[Any]:
            async for response in behaviour(refusing(request_iterator), context):
                yield response

        return stream_stream

    async def stream_unary(request_iterator: Any, context: Any) -> Any:
        return await behaviour(refusing(request_iterator), context)

    return stream_unary


def add_handlers(
    server: grpc.aio.Server, service_name: str, handlers: dict[str, grpc.RpcMethodHandler]
) -> None:
    """Registers a handler table as the generated add_*Servicer_to_server does."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
    server.add_registered_method_handlers(service_name, handlers)  # type: ignore[attr-defined]


@dataclass
class Service:
    """What a service hands to the bootstrap."""

    name: str  # "blob", "link", "gateway": for logs and the ready line
    service_names: Sequence[str]  # full gRPC service names, for health and reflection
    register: Callable[[grpc.aio.Server], None]
    on_stop: Callable[[], Awaitable[None]] | None = None
    extra_options: list[tuple[str, int]] = field(default_factory=list)
    # Whether the service authenticates its callers as configured; one that does not starts
    # only when told it may serve openly (--open).
    secured: bool = False
    # TLS (linkedblob.tls); None serves plaintext.
    credentials: grpc.ServerCredentials | None = None
    interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    # More ports on the same server: (name, port, credentials or None), e.g. blobsvc's direct
    # port; each gets its own ready line, `linkedblob NAME listening on HOST:PORT`, first.
    listeners: Sequence[tuple[str, int, grpc.ServerCredentials | None]] = ()
    # Streams per connection, idle and old connections (the flags: ServerLimits.from_args).
    limits: ServerLimits = field(default_factory=ServerLimits)
    # What the service needs to do its work (linkedblob.health.Check): its health answers
    # SERVING on "", "readiness" and its service names only while this passes; None: always.
    readiness: Check | None = None


class ListenError(OSError):
    """A port that cannot be bound (in use, or not an address of this host): exit status 2."""


def _listen(
    server: grpc.aio.Server,
    address: str,
    credentials: grpc.ServerCredentials | None,
    flags: str = "--host/--port",
) -> int:
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio: "Failed to bind to address ..."
        bound = 0
    if bound == 0:
        raise ListenError(
            f"cannot listen on {address}: the port is in use or the address is not this host's "
            f"(choose another with {flags})"
        )
    return bound


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: Any  # grpc_health.v1.health.aio.HealthServicer
    port: int
    service: Service
    listener_ports: dict[str, int] = field(default_factory=dict)
    readiness: Readiness | None = None

    async def stop(self, grace: float | None) -> None:
        """Reports NOT_SERVING, stops taking calls, drains in-flight ones for up to ``grace``."""
        if self.readiness is not None:
            await self.readiness.stop()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.service.on_stop is not None:
            await self.service.on_stop()


async def start(service: Service, host: str, port: int) -> RunningServer:
    server = grpc.aio.server(
        options=server_options(limits=service.limits) + service.extra_options,
        interceptors=[*tracing.server_interceptors(), *service.interceptors] or None,
    )
    service.register(server)
    health_servicer = AioHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable(server, [*service.service_names, health.SERVICE_NAME])
    bound = _listen(server, f"{host}:{port}", service.credentials)
    listener_ports = {
        name: _listen(server, f"{host}:{extra_port}", credentials, f"--{name}-port")
        for name, extra_port, credentials in service.listeners
    }
    await server.start()
    ready = Readiness(health_servicer, service.service_names, service.readiness)
    await ready.start()
    return RunningServer(server, health_servicer, bound, service, listener_ports, ready)


async def serve_until_signalled(
    service: Service, host: str, port: int, grace: float, metrics_port: int = -1
) -> None:
    running = await start(service, host, port)
    if metrics_port >= 0:
        try:
            mport = metrics.start_http(host, metrics_port)
        except OSError as exc:
            await running.stop(0)
            address = f"{host}:{metrics_port}"
            raise ListenError(
                f"cannot listen on {address}: {exc.strerror} (--metrics-port)"
            ) from exc
        log.info("metrics on http://%s:%d/metrics", host, mport)
    display_host = f"[{host}]" if ":" in host else host
    for name, extra_port in running.listener_ports.items():
        print(f"linkedblob {name} listening on {display_host}:{extra_port}", flush=True)
    print(f"linkedblob {service.name} listening on {display_host}:{running.port}", flush=True)
    loop = asyncio.get_running_loop()
    log.info(
        "serving",
        extra={
            "service": service.name,
            "port": running.port,
            "event_loop": f"{type(loop).__module__}.{type(loop).__name__}",
        },
    )

    trimmer = asyncio.create_task(release_memory_when_quiet())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down; draining for up to %.0fs", grace)
    trimmer.cancel()
    await running.stop(grace)
    log.info("stopped")


# How long the server must have started no call, with none in flight, before it hands its
# free heap back to the OS.
QUIET_SECONDS = 1.0


async def release_memory_when_quiet(quiet: float = QUIET_SECONDS) -> None:
    """After a burst of calls, once the server is quiet, returns the heap it freed to the OS.

    The servers keep freed message buffers for reuse (linkedblob.tuning: glibc's trim threshold
    at 1 GiB, which streaming needs), so without this a burst of concurrent streams left the
    process at its peak for good (bench/README.md, "idle trim"). Never while a call is in
    flight: trimming mid-stream would make the next messages fault their pages in again.
    """
    activity = metrics.ACTIVITY
    seen = activity.started
    busy_since_trim = False
    while True:
        await asyncio.sleep(quiet)
        if activity.started != seen:
            seen, busy_since_trim = activity.started, True
        elif busy_since_trim and activity.in_flight == 0:
            busy_since_trim = False
            await asyncio.to_thread(release_free_memory)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop the servers run on: uvloop when installed, unless
    LINKEDBLOB_EVENT_LOOP=asyncio asks for the standard library's."""
    if os.environ.get("LINKEDBLOB_EVENT_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def refuse_unless_secured(service: Service, open_: bool) -> None:
    """Exits 2 with one line on stderr when the service would serve without authentication and
    was not told it may (--open)."""
    if service.secured or open_:
        return
    print(
        f"linkedblob {service.name}: refusing to start without authentication; configure it "
        "(see `linkedblob serve " + service.name + " --help`) or pass --open "
        "(LINKEDBLOB_OPEN=true) to let anyone who reaches the port call",
        file=sys.stderr,
    )
    raise SystemExit(2)


def run(
    service: Service,
    host: str,
    port: int,
    grace: float,
    metrics_port: int = -1,
    *,
    open_: bool = False,
) -> None:
    """Runs the service until SIGTERM/SIGINT (the process's main entry for `serve`)."""
    refuse_unless_secured(service, open_)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(serve_until_signalled(service, host, port, grace, metrics_port))
    except OSError as exc:
        print(f"linkedblob {service.name}: {exc}", file=sys.stderr)
        raise SystemExit(2 if isinstance(exc, ListenError) else 1) from exc
