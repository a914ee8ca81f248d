"""Prometheus metrics shared by the services.

The gRPC metrics carry the names and labels of go-grpc-prometheus / py-grpc-prometheus, so the
dashboards made for them work as they are: ``grpc_server_started_total``,
``grpc_server_handled_total`` (with ``grpc_code``), ``grpc_server_handling_seconds``,
``grpc_server_msg_received_total`` and ``grpc_server_msg_sent_total`` (labels ``grpc_type``,
``grpc_service``, ``grpc_method``), counted by the servicer wrapper (linkedblob.rpc); and the
``grpc_client_*`` of the gateway's and the collector's calls to the backends
(linkedblob.interceptors). The domain metrics (storage, SQL, link cache, uploads) live here too so
that every service exports one set of names; the collector's are in collector.metrics.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

_GRPC = ["grpc_type", "grpc_service", "grpc_method"]
# go-grpc-prometheus's default buckets, with finer ones below 5 ms (the unary calls' range).
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120,
)  # fmt: skip

SERVER_STARTED = Counter(
    "grpc_server_started_total", "Total number of RPCs started on the server.", _GRPC
)
SERVER_HANDLED = Counter(
    "grpc_server_handled_total",
    "Total number of RPCs completed on the server, regardless of success or failure.",
    [*_GRPC, "grpc_code"],
)
SERVER_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Histogram of response latency (seconds) of gRPC that had been application-level handled "
    "by the server.",
    _GRPC,
    buckets=_LATENCY_BUCKETS,
)
SERVER_MSG_RECEIVED = Counter(
    "grpc_server_msg_received_total",
    "Total number of RPC stream messages received on the server.",
    _GRPC,
)
SERVER_MSG_SENT = Counter(
    "grpc_server_msg_sent_total", "Total number of gRPC stream messages sent by the server.", _GRPC
)

CLIENT_STARTED = Counter(
    "grpc_client_started_total", "Total number of RPCs started on the client.", _GRPC
)
CLIENT_HANDLED = Counter(
    "grpc_client_handled_total",
    "Total number of RPCs completed by the client, regardless of success or failure.",
    [*_GRPC, "grpc_code"],
)
CLIENT_HANDLING_SECONDS = Histogram(
    "grpc_client_handling_seconds",
    "Histogram of response latency (seconds) of the gRPC until it is finished by the application.",
    _GRPC,
    buckets=_LATENCY_BUCKETS,
)

# Blob bytes through the public byte streams, by method (gateway and blobsvc).
BYTES_IN = Counter("linkedblob_bytes_received_total", "Blob bytes received", ["method"])
BYTES_OUT = Counter("linkedblob_bytes_sent_total", "Blob bytes sent", ["method"])

# blobsvc's storage: blobsvc.storage.metrics (a wrapper on the driver interface).

# linksvc's database (linksvc.database).
SQL_SECONDS = Histogram(
    "linkedblob_sql_operation_seconds",
    "Time of a database operation (its transaction: one or a few statements), by operation",
    ["op"],
    buckets=_LATENCY_BUCKETS,
)
SQL_ERRORS = Counter(
    "linkedblob_sql_errors_total",
    "Database operations that failed, by operation and error (busy, transient, error)",
    ["op", "error"],
)
SQL_POOL_IN_USE = Gauge(
    "linkedblob_sql_pool_connections_in_use",
    "Database connections checked out of the pool (the SQL threads hold theirs)",
)

# The gateway's link cache (gateway.linkcache).
CACHE_LOOKUPS = Counter(
    "linkedblob_link_cache_lookups_total", "Link cache lookups, by result (hit, miss)", ["result"]
)
CACHE_EVICTIONS = Counter(
    "linkedblob_link_cache_evictions_total", "Links the cache dropped to stay within its size"
)

# Uploads in progress: the client streams being served (the gateway's PushBlob and WriteUpload,
# blobsvc's Write), kept by linkedblob.rpc.
UPLOADS_IN_PROGRESS = Gauge(
    "linkedblob_uploads_in_progress",
    "Upload streams (client-streaming calls) being served now",
    ["grpc_service", "grpc_method"],
)


class Activity:
    """Calls started so far and calls in flight, kept by the servicer wrapper
    (linkedblob.rpc.servicer_method) for the bootstrap to see when the server is quiet. Plain
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
