"""Balanced replicas: two blobsvc and two linksvc behind gateways whose --blob-addr and
--link-addr each name both (gRPC's multi-address target ``ipv4:a:p,b:p``, what a headless
Service's DNS name resolves to), and a client over two gateways. Calls spread over every
replica (round_robin, linkedblob.transport) and keep working when one of each is stopped.

Counted where the calls land: the blobs each blobsvc stored in its own directory, and the
calls each linksvc and gateway served (their /metrics, health checks left out).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from linkedblob.client import Client
from linkedblob.v1 import registry_pb2 as pb
from tests.services import ServiceProcess, spawn
from tests.stack import database, free_port, registry, scrape, spawn_gateway

CALLS = 20
# Each replica's share of CALLS calls under round_robin is about half; pick_first gives one
# replica none.
AT_LEAST = CALLS // 4
# The served-call counter (the standard gRPC one).
CALL_COUNTERS = "grpc_server_handled_total{"


def served(metrics_port: int) -> float:
    """Calls a server answered so far, health checks left out."""
    return sum(
        value
        for sample, value in scrape(metrics_port).items()
        if sample.startswith(CALL_COUNTERS) and "Health" not in sample
    )


def stored(data: Path) -> int:
    """Blobs in a blobsvc's store."""
    return sum(1 for p in (data / "blobs").rglob("*") if p.is_file())


def multi(*services: ServiceProcess) -> str:
    """One gRPC target naming every service's address."""
    return "ipv4:" + ",".join(s.address for s in services)


@dataclass
class Replicas:
    data: list[Path]
    blobs: list[ServiceProcess]
    links: list[ServiceProcess]
    link_metrics: list[int]
    gateways: list[ServiceProcess]
    gateway_metrics: list[int]

    def stop(self) -> None:
        for svc in (*self.gateways, *self.links, *self.blobs):
            svc.stop()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    directory = tmp_path_factory.mktemp("balancing")
    data = [directory / "blobs-1", directory / "blobs-2"]
    link_metrics = [free_port(), free_port()]
    gateway_metrics = [free_port(), free_port()]
    quiet = ("--log-level", "WARNING")
    with database("sqlite", directory) as url, ThreadPoolExecutor(4) as pool:
        # The first linksvc migrates the shared database; the second starts on it.
        first_link = pool.submit(
            spawn, "link", "--db", url, "--migrate", "--metrics-port", str(link_metrics[0]), *quiet
        )
        blobs = list(pool.map(lambda d: spawn("blob", "--data", str(d), *quiet), data))
        links = [
            first_link.result(),
            spawn("link", "--db", url, "--metrics-port", str(link_metrics[1]), *quiet),
        ]
        gateways = list(
            pool.map(
                lambda port: spawn_gateway(
                    multi(*blobs), multi(*links), args=("--metrics-port", str(port))
                ),
                gateway_metrics,
            )
        )
        r = Replicas(data, blobs, links, link_metrics, gateways, gateway_metrics)
        try:
            yield r
        finally:
            r.stop()


def _put(stub: object, repository: str) -> None:
    data = secrets.token_bytes(64)
    answer = stub.PutBlob(pb.PutBlobRequest(repository=repository, data=data), timeout=10)  # type: ignore[attr-defined]
    assert answer.size == len(data)


def test_a_gateway_spreads_calls_over_both_backend_replicas(replicas: Replicas) -> None:
    stub = registry(replicas.gateways[0].address)
    blobs_before = [stored(d) for d in replicas.data]
    links_before = [served(p) for p in replicas.link_metrics]
    for _ in range(CALLS):
        _put(stub, "balanced/backends")
    new_blobs = [stored(d) - before for d, before in zip(replicas.data, blobs_before, strict=True)]
    link_calls = [
        served(p) - before for p, before in zip(replicas.link_metrics, links_before, strict=True)
    ]
    assert sum(new_blobs) == CALLS
    assert min(new_blobs) >= AT_LEAST, new_blobs
    assert min(link_calls) >= AT_LEAST, link_calls


def test_a_client_spreads_calls_over_gateways_and_takes_a_dns_name(replicas: Replicas) -> None:
    before = [served(p) for p in replicas.gateway_metrics]
    with Client(multi(*replicas.gateways), direct=False) as client:
        for _ in range(CALLS):
            client.put("balanced/gateways", secrets.token_bytes(64))
    calls = [served(p) - b for p, b in zip(replicas.gateway_metrics, before, strict=True)]
    assert sum(calls) == CALLS
    assert min(calls) >= AT_LEAST, calls
    # A DNS name (localhost: 127.0.0.1, and ::1 where nothing listens) is balanced over too.
    with Client(f"dns:///localhost:{replicas.gateways[0].port}", direct=False) as client:
        data = secrets.token_bytes(64)
        assert client.put("balanced/dns", data).size == len(data)


def test_calls_go_on_when_one_replica_of_each_backend_is_gone(replicas: Replicas) -> None:
    """Last in the module: it stops a replica of each backend."""
    replicas.blobs[1].stop()
    replicas.links[1].stop()
    stub = registry(replicas.gateways[0].address)
    survivor_before = stored(replicas.data[0])
    for _ in range(CALLS):
        _put(stub, "balanced/survivors")
    assert stored(replicas.data[0]) - survivor_before == CALLS
