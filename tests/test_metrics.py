"""The services' Prometheus metrics after real calls: the standard gRPC names and labels
(server and client side), and the storage, SQL, link cache and upload metrics."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from linkedblob.client import Client
from linkedblob.v1 import registry_pb2 as pb
from tests.stack import scrape
from tests.telemetry import (
    BLOB_SERVICE,
    LINK_SERVICE,
    REGISTRY,
    TelemetryStack,
    telemetry_stack,
)

REPO = "metrics/test"
DATA = b"metrics " * 1000
DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "linkedblob-dashboard.json"
PUSHED = b"x" * (3 * 1024 * 1024)  # more than one message of the client's


def grpc_labels(kind: str, service: str, method: str, code: str = "") -> str:
    coded = f'grpc_code="{code}",' if code else ""
    return f'{{{coded}grpc_method="{method}",grpc_service="{service}",grpc_type="{kind}"}}'


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TelemetryStack]:
    with telemetry_stack(tmp_path_factory.mktemp("metrics")) as running:
        stub = running.stub()
        stub.PutBlob(pb.PutBlobRequest(repository=REPO, data=DATA))
        digest = "sha256:" + hashlib.sha256(DATA).hexdigest()
        stub.StatBlob(pb.StatBlobRequest(repository=REPO, digest=digest))
        stub.StatBlob(pb.StatBlobRequest(repository=REPO, digest=digest))  # a cache hit
        with pytest.raises(grpc.RpcError) as missing:
            stub.StatBlob(pb.StatBlobRequest(repository=REPO, digest="sha256:" + "0" * 64))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        read = b"".join(
            r.data for r in stub.ReadBlob(pb.ReadBlobRequest(repository=REPO, digest=digest))
        )
        assert read == DATA
        with Client(running.gateway.address, direct=False) as client:
            client.push(REPO, PUSHED)
        yield running


def metrics_of(stack: TelemetryStack, kind: str) -> dict[str, float]:
    return scrape(stack.metrics_ports[kind])


def test_the_gateway_counts_calls_under_the_standard_names(stack: TelemetryStack) -> None:
    samples = metrics_of(stack, "gateway")
    put = grpc_labels("unary", REGISTRY, "PutBlob")
    assert samples["grpc_server_started_total" + put] == 1
    assert (
        samples["grpc_server_handled_total" + grpc_labels("unary", REGISTRY, "PutBlob", "OK")] == 1
    )
    assert samples["grpc_server_handling_seconds_count" + put] == 1
    stat = grpc_labels("unary", REGISTRY, "StatBlob")
    assert samples["grpc_server_started_total" + stat] == 3
    assert (
        samples["grpc_server_handled_total" + grpc_labels("unary", REGISTRY, "StatBlob", "OK")] == 2
    )
    not_found = grpc_labels("unary", REGISTRY, "StatBlob", "NOT_FOUND")
    assert samples["grpc_server_handled_total" + not_found] == 1
    # Streams count their messages: ReadBlob one request in, one data message out (and its
    # header); PushBlob several in, one out.
    read = grpc_labels("server_stream", REGISTRY, "ReadBlob")
    assert samples["grpc_server_msg_received_total" + read] == 1
    assert samples["grpc_server_msg_sent_total" + read] >= 1
    push = grpc_labels("client_stream", REGISTRY, "PushBlob")
    assert samples["grpc_server_msg_received_total" + push] >= 2
    assert samples["grpc_server_msg_sent_total" + push] == 1
    # Unary calls count no messages; the old names are gone.
    assert "grpc_server_msg_received_total" + put not in samples
    assert not [name for name in samples if name.startswith(("linkedblob_rpc_", "linkedblob_rpcs"))]


def test_the_gateway_counts_its_backend_calls(stack: TelemetryStack) -> None:
    samples = metrics_of(stack, "gateway")
    resolve_missing = grpc_labels("unary", LINK_SERVICE, "Resolve", "NOT_FOUND")
    assert samples["grpc_client_handled_total" + resolve_missing] >= 1
    handled = {
        name: value
        for name, value in samples.items()
        if name.startswith("grpc_client_handled_total") and 'grpc_code="OK"' in name
    }
    assert any(BLOB_SERVICE in name for name in handled), handled
    assert any(LINK_SERVICE in name for name in handled), handled
    started = sum(v for n, v in samples.items() if n.startswith("grpc_client_started_total"))
    finished = sum(v for n, v in samples.items() if n.startswith("grpc_client_handled_total"))
    assert started == finished > 0
    assert (
        samples[
            "grpc_client_handling_seconds_count" + grpc_labels("unary", LINK_SERVICE, "Resolve")
        ]
        >= 1
    )
    # ReadBlob's relay of blobsvc's Read: a unary-stream client call.
    read = grpc_labels("server_stream", BLOB_SERVICE, "Read", "OK")
    assert samples["grpc_client_handled_total" + read] == 1


def test_the_link_cache_is_counted(stack: TelemetryStack) -> None:
    samples = metrics_of(stack, "gateway")
    assert samples['linkedblob_link_cache_lookups_total{result="hit"}'] >= 1
    assert samples['linkedblob_link_cache_lookups_total{result="miss"}'] >= 1
    assert samples["linkedblob_link_cache_evictions_total"] == 0


def test_blobsvc_counts_its_store(stack: TelemetryStack) -> None:
    samples = metrics_of(stack, "blob")

    def storage(metric: str, action: str) -> float:
        """The sample of ``action`` whatever the driver (the stack's is the filesystem)."""
        found = [
            v for n, v in samples.items() if n.startswith(f'{metric}{{action="{action}",driver=')
        ]
        assert len(found) == 1, (metric, action, found)
        return found[0]

    assert storage("linkedblob_storage_bytes_total", "put") == len(DATA)
    assert storage("linkedblob_storage_bytes_total", "append") >= len(PUSHED)
    assert storage("linkedblob_storage_bytes_total", "read") >= len(DATA)
    assert storage("linkedblob_storage_action_seconds_count", "put") == 1
    assert storage("linkedblob_storage_action_seconds_count", "read") == 1  # one per stream
    assert storage("linkedblob_storage_action_seconds_count", "store") >= 1
    assert storage("linkedblob_storage_errors_total", "put") == 0
    uploading = 'linkedblob_uploads_in_progress{grpc_method="Write",grpc_service="%s"}'
    assert samples[uploading % BLOB_SERVICE] == 0
    write = grpc_labels("client_stream", BLOB_SERVICE, "Write")
    assert samples["grpc_server_msg_received_total" + write] >= 2
    assert (
        samples["grpc_server_handled_total" + grpc_labels("unary", BLOB_SERVICE, "Put", "OK")] == 1
    )


def test_linksvc_counts_its_database(stack: TelemetryStack) -> None:
    samples = metrics_of(stack, "link")
    operations = {
        n: v for n, v in samples.items() if n.startswith("linkedblob_sql_operation_seconds_count")
    }
    assert sum(operations.values()) >= 4, operations
    assert "linkedblob_sql_pool_connections_in_use" in samples
    not_found = grpc_labels("unary", LINK_SERVICE, "Resolve", "NOT_FOUND")
    assert samples["grpc_server_handled_total" + not_found] >= 1


def test_the_dashboard_uses_only_metrics_the_services_export() -> None:
    from prometheus_client import REGISTRY

    import blobsvc.storage.metrics  # noqa: F401  (registers the storage metrics)
    import collector.metrics  # noqa: F401  (registers the collector's metrics)
    import linkedblob.metrics  # noqa: F401

    exported = {sample.name for family in REGISTRY.collect() for sample in family.samples} | {
        family.name for family in REGISTRY.collect()
    }
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    labels = {"grpc_type", "grpc_service", "grpc_method", "grpc_code"}
    used = {n for e in exprs for n in re.findall(r"\b(?:grpc|linkedblob)_\w+", e)} - labels
    assert used
    # Metrics with labels export no sample before their first call: compare the family names.
    families = {name.removesuffix("_total") for name in exported}
    suffixes = ("_bucket", "_count", "_sum", "_total")
    unknown = set()
    for name in used:
        base = name
        for suffix in suffixes:
            base = base.removesuffix(suffix)
        if base not in families:
            unknown.add(name)
    assert not unknown


def test_an_upload_in_progress_is_counted_until_it_ends(stack: TelemetryStack) -> None:
    uploading = 'linkedblob_uploads_in_progress{grpc_method="%s",grpc_service="%s"}'
    gateway_push = uploading % ("PushBlob", REGISTRY)
    blob_write = uploading % ("Write", BLOB_SERVICE)
    data = b"u" * 1000
    release = threading.Event()

    def messages() -> Iterator[pb.PushBlobRequest]:
        yield pb.PushBlobRequest(header=pb.PushBlobRequest.Header(repository=REPO))
        yield pb.PushBlobRequest(data=data)
        release.wait(30)

    future = stack.stub().PushBlob.future(messages())
    try:
        deadline = time.monotonic() + 10
        while metrics_of(stack, "gateway").get(gateway_push) != 1:
            assert time.monotonic() < deadline, "the push is not counted in progress"
            time.sleep(0.05)
        while metrics_of(stack, "blob").get(blob_write) != 1:
            assert time.monotonic() < deadline, "blobsvc's Write is not counted in progress"
            time.sleep(0.05)
    finally:
        release.set()
    assert future.result(timeout=30).size == len(data)
    assert metrics_of(stack, "gateway")[gateway_push] == 0
    deadline = time.monotonic() + 10
    while metrics_of(stack, "blob")[blob_write] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_gc_run_is_counted_and_only_a_completed_one_stamps_the_last_success() -> None:
    from prometheus_client import REGISTRY

    from collector import metrics as gc_metrics
    from collector.stats import ERROR, OK, RunStats

    def value(name: str, labels: dict[str, str] | None = None) -> float:
        return REGISTRY.get_sample_value(name, labels or {}) or 0.0

    runs, freed = (
        value("linkedblob_gc_runs_total", {"outcome": OK}),
        value("linkedblob_gc_reclaimed_bytes_total"),
    )
    stamped = value("linkedblob_gc_last_success_timestamp_seconds")
    gc_metrics.record(RunStats(outcome=ERROR, error="linksvc down"))
    assert value("linkedblob_gc_last_success_timestamp_seconds") == stamped
    before = time.time()
    gc_metrics.record(RunStats(outcome=OK, reclaimed_blobs=2, reclaimed_bytes=300))
    assert value("linkedblob_gc_runs_total", {"outcome": OK}) == runs + 1
    assert value("linkedblob_gc_reclaimed_bytes_total") == freed + 300
    assert value("linkedblob_gc_last_success_timestamp_seconds") >= before
