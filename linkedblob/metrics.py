"""Prometheus metrics shared by the services: calls by method and code, and their latency."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

RPCS = Counter(
    "linkedblob_rpcs_total", "gRPC calls served, by method and status code", ["method", "code"]
)
RPC_SECONDS = Histogram(
    "linkedblob_rpc_seconds",
    "Time to serve a gRPC call, by method",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 120),
)
BYTES_IN = Counter("linkedblob_bytes_received_total", "Blob bytes received", ["method"])
BYTES_OUT = Counter("linkedblob_bytes_sent_total", "Blob bytes sent", ["method"])


class Activity:
    """Calls started so far and calls in flight, kept by the servicer wrapper
    (linkedblob.rpc.records_metrics) for the bootstrap to see when the server is quiet. Plain
    integers: only the event loop's thread touches them."""

    __slots__ = ("in_flight", "started")

    def __init__(self) -> None:
        self.started = 0
        self.in_flight = 0


ACTIVITY = Activity()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape."""


def _only_metrics(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """``app`` at /metrics and nothing elsewhere: prometheus_client answers every path with the
    metrics, so /healthz looked healthy however the service was."""

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/metrics":
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: the metrics are at /metrics\n"]

    return serve


def start_http(host: str, port: int) -> int:
    """Serves /metrics (only) from a daemon thread; returns the bound port."""

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    httpd = make_server(
        host.strip("[]"), port, _only_metrics(make_wsgi_app()), Server, handler_class=_QuietHandler
    )
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return int(httpd.server_port)
