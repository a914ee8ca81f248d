"""The access log: one JSON line per call at each service, with the call's request id
(x-request-id) carried from the gateway to blobsvc and linksvc and returned to the caller."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from linkedblob.blob.v1 import blob_pb2, blob_pb2_grpc
from linkedblob.client import Client
from linkedblob.v1 import registry_pb2 as pb
from tests.services import running
from tests.telemetry import TelemetryStack, log_lines, telemetry_stack, wait_for

REPO = "access/log"
DATA = b"access " * 500
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
FIELDS = {
    "service",
    "method",
    "repository",
    "digest",
    "code",
    "reason",
    "seconds",
    "bytes_in",
    "bytes_out",
    "peer",
    "request_id",
    "caller",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TelemetryStack]:
    with telemetry_stack(tmp_path_factory.mktemp("access")) as running_stack:
        running_stack.stub().PutBlob(pb.PutBlobRequest(repository=REPO, data=DATA))
        yield running_stack


def lines_with(svc: Any, request_id: str, method: str = "") -> list[dict[str, Any]]:
    return [
        line
        for line in log_lines(svc)
        if line["request_id"] == request_id and (not method or line["method"] == method)
    ]


def stat(stack: TelemetryStack, digest: str, metadata: Any = ()) -> tuple[Any, dict[str, str]]:
    """StatBlob: its code and the trailing metadata the gateway returned."""
    future = stack.stub().StatBlob.future(
        pb.StatBlobRequest(repository=REPO, digest=digest), metadata=metadata
    )
    try:
        future.result()
        code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        code = err.code()
    return code, dict(future.trailing_metadata())


def test_the_callers_request_id_reaches_the_backends_logs(stack: TelemetryStack) -> None:
    missing = "sha256:" + "1" * 64
    code, returned = stat(stack, missing, (("x-request-id", "test-rid-1"),))
    assert code == grpc.StatusCode.NOT_FOUND
    assert returned["x-request-id"] == "test-rid-1"
    [line] = wait_for(lambda: lines_with(stack.gateway, "test-rid-1"), "gateway line")
    assert line.keys() >= FIELDS
    assert line["method"] == "StatBlob"
    assert line["service"] == "linkedblob.v1.Registry"
    assert (line["repository"], line["digest"]) == (REPO, missing)
    assert (line["code"], line["reason"]) == ("NOT_FOUND", "BLOB_UNKNOWN")
    assert line["seconds"] > 0 and line["peer"]
    linked = wait_for(lambda: lines_with(stack.link, "test-rid-1"), "linksvc line")
    assert {entry["method"] for entry in linked} == {"Resolve"}
    assert linked[0]["code"] == "NOT_FOUND"
    assert linked[0]["digest"] == missing


def test_the_gateway_makes_an_id_when_the_caller_sends_none_or_a_bad_one(
    stack: TelemetryStack,
) -> None:
    made = set()
    for metadata in ((), (("x-request-id", "has space"),), (("x-request-id", "x" * 129),)):
        code, returned = stat(stack, DIGEST, metadata)
        assert code == grpc.StatusCode.OK
        rid = returned["x-request-id"]
        assert len(rid) == 16 and rid not in made
        made.add(rid)
        [line] = wait_for(lambda rid=rid: lines_with(stack.gateway, rid), "gateway line")
        assert (line["code"], line["digest"]) == ("OK", DIGEST)


def test_a_push_logs_its_bytes_at_the_gateway_and_at_blobsvc(stack: TelemetryStack) -> None:
    pushed = b"p" * (3 * 1024 * 1024)
    with Client(stack.gateway.address, direct=False) as client:
        client.push(REPO, pushed)
    [line] = wait_for(
        lambda: [x for x in log_lines(stack.gateway) if x["method"] == "PushBlob"], "PushBlob"
    )
    assert line["code"] == "OK" and line["bytes_in"] >= len(pushed)
    assert line["repository"] == REPO  # noted by the servicer from the stream's header
    rid = line["request_id"]
    writes = wait_for(lambda: lines_with(stack.blob, rid, "Write"), "blobsvc Write line")
    assert sum(w["bytes_in"] for w in writes) >= len(pushed)
    assert wait_for(lambda: lines_with(stack.link, rid), "linksvc lines")
    # A read's bytes out, at blobsvc and at the gateway.
    read = b"".join(
        r.data
        for r in stack.stub().ReadBlob(
            pb.ReadBlobRequest(repository=REPO, digest=DIGEST),
            metadata=(("x-request-id", "read-1"),),
        )
    )
    assert read == DATA
    [gateway_read] = wait_for(lambda: lines_with(stack.gateway, "read-1", "ReadBlob"), "read")
    assert gateway_read["bytes_out"] >= len(DATA)
    [blob_read] = wait_for(lambda: lines_with(stack.blob, "read-1", "Read"), "blobsvc Read")
    assert blob_read["bytes_out"] >= len(DATA) and blob_read["digest"] == DIGEST


def test_access_log_off(tmp_path: Path) -> None:
    with running(
        "blob", "--data", str(tmp_path), "--log-level", "INFO", "--access-log", "off"
    ) as blob:
        stub = blob_pb2_grpc.BlobServiceStub(blob.channel())
        with pytest.raises(grpc.RpcError):
            stub.Stat(blob_pb2.StatRequest(digest="sha256:" + "2" * 64))
    assert not log_lines(blob)
    assert log_lines(blob, "linkedblob.server")  # the other logs are on


def test_grpcurl_shows_the_request_id_as_the_readme_says(stack: TelemetryStack) -> None:
    grpcurl = Path(sys.executable).parent / "grpcurl"
    request = json.dumps({"repository": REPO, "digest": DIGEST})
    out = subprocess.run(
        [
            *(grpcurl, "-plaintext", "-v", "-H", "x-request-id: my-id-1", "-d", request),
            *(stack.gateway.address, "linkedblob.v1.Registry/StatBlob"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "x-request-id: my-id-1" in out
    assert wait_for(lambda: lines_with(stack.gateway, "my-id-1"), "gateway line")
