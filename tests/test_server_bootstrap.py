"""The shared server bootstrap (linkedblob.server): the event loop the services run on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from linkedblob.server import event_loop_factory
from tests.services import running


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
