"""Prometheus metrics shared by the services: calls by method and code, and their latency."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

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


def start_http(host: str, port: int) -> int:
    """Serves /metrics; returns the bound port."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
