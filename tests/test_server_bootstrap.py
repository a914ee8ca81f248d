"""The shared server bootstrap (linkedblob.server): the event loop the services run on."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from linkedblob.blob.v1 import blob_pb2 as pb
from linkedblob.blob.v1 import blob_pb2_grpc
from linkedblob.server import event_loop_factory
from tests.services import running

MiB = 1024 * 1024


def test_servers_run_on_uvloop_unless_asked_for_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LINKEDBLOB_EVENT_LOOP", raising=False)
    factory = event_loop_factory()
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    monkeypatch.setenv("LINKEDBLOB_EVENT_LOOP", "asyncio")
    assert event_loop_factory() is None  # asyncio.Runner's default loop


@pytest.mark.parametrize(("setting", "loop"), [("uvloop", "uvloop."), ("asyncio", "asyncio.")])
def test_a_service_serves_and_stops_on_either_loop(setting: str, loop: str, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'link.db'}"
    env = {"LINKEDBLOB_EVENT_LOOP": setting}
    with running("link", "--db", db, "--migrate", env=env) as svc, svc.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert svc.stop() == 0  # SIGTERM: drained and stopped cleanly
    logged = [json.loads(line) for line in svc.output if line.startswith("{")]
    (serving,) = [entry for entry in logged if entry["msg"] == "serving"]
    assert serving["event_loop"].startswith(loop), serving


def test_a_server_hands_freed_memory_back_once_quiet(tmp_path: Path) -> None:
    """After a burst of concurrent uploads blobsvc returns the heap it freed (the bootstrap's
    idle trim); without that it stayed at its peak (~110 MiB against ~51 idle here)."""
    with running("blob", "--data", str(tmp_path)) as svc, svc.channel() as channel:
        stub = blob_pb2_grpc.BlobServiceStub(channel)
        idle = svc.rss()

        def upload(i: int) -> None:
            block = i.to_bytes(8, "big") * (MiB // 8)
            stub.Write(
                iter(
                    [pb.WriteRequest(upload_id=f"burst-{i}", offset=0, data=block, commit=True)]
                    + [pb.WriteRequest(data=block) for _ in range(31)]
                )
            )

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(upload, range(8)))
        grew = svc.peak_rss() - idle
        assert grew > 24 * MiB, "the burst did not grow the heap: nothing to see here"
        deadline = time.monotonic() + 60
        while svc.rss() > idle + grew // 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert svc.rss() <= idle + grew // 2, (idle // MiB, grew // MiB, svc.rss() // MiB)


@pytest.mark.parametrize(
    ("kind", "args"),
    [
        ("blob", ["--data", "{tmp}/blobs"]),
        ("link", ["--db", "sqlite:///{tmp}/links.db", "--migrate"]),
        ("gateway", []),
    ],
)
def test_a_server_without_authentication_refuses_to_start_unless_open(
    kind: str, args: list[str], tmp_path: Path
) -> None:
    import subprocess
    import sys

    argv = [a.format(tmp=tmp_path) for a in args]
    cmd = [sys.executable, "-m", "linkedblob.cli", "serve", kind, "--port", "0", *argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKEDBLOB_")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    assert "refusing to start without authentication" in done.stderr
    assert "--open" in done.stderr
    assert "Traceback" not in done.stderr
    # The same server, told it may serve openly, starts.
    with running(kind, *argv):
        pass


def test_up_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "linkedblob.cli",
        "up",
        "--host",
        "0.0.0.0",
        "--data",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "refusing to serve on 0.0.0.0 without authentication" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing was started or created


def test_the_metrics_port_serves_metrics_at_metrics_only(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    from tests.stack import free_port, scrape

    port = free_port()
    with running("blob", "--data", str(tmp_path), "--metrics-port", str(port)):
        assert any(name.startswith("linkedblob_") for name in scrape(port))
        for path in ("/", "/healthz", "/metrics/x", "/favicon.ico"):
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10)
            assert caught.value.code == 404, path
