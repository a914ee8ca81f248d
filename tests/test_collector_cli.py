"""The collector's command line without live backends: durations, usage errors, and `serve gc`
as a worker (ready line, health, metrics, a clean stop on SIGTERM) whose runs fail while
linksvc is unreachable."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from linkedblob import exitcodes
from linkedblob.config import add_duration_option, parse_duration
from tests.services import spawn
from tests.stack import free_port, scrape


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("24h", 86400), ("7d", 604800), ("90", 90), ("0.5", 0.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "x", "1w", "-1", "nan", "inf", "h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_a_duration_option_reads_its_own_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINKEDBLOB_GRACE", "30")  # the servers' drain time: not the GC's grace
    monkeypatch.setenv("LINKEDBLOB_GC_GRACE", "2h")
    parser = argparse.ArgumentParser()
    add_duration_option(parser, "--grace", default="24h", env="LINKEDBLOB_GC_GRACE", help="")
    assert parser.parse_args([]).grace == 7200
    assert parser.parse_args(["--grace", "5m"]).grace == 300


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "linkedblob.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_usage_errors_exit_2() -> None:
    bad = cli("gc", "--grace", "1w")
    assert bad.returncode == 2 and "invalid duration value: '1w'" in bad.stderr
    short = cli("gc", "--takeover", "30s", "--delete-timeout", "30s")
    assert short.returncode == 2 and "at least twice the delete timeout" in short.stderr


def test_gc_and_fsck_against_an_unreachable_linksvc_fail_cleanly() -> None:
    dead = f"127.0.0.1:{free_port()}"
    run = cli("gc", "--link-addr", dead, "--blob-addr", dead, "--json")
    assert run.returncode == 1, run.stderr
    assert '"outcome": "error"' in run.stdout and "UNAVAILABLE" in run.stdout
    check = cli("fsck", "--link-addr", dead, "--blob-addr", dead)
    assert check.returncode == exitcodes.RETRY and "cannot check" in check.stderr


def test_serve_gc_is_a_worker_with_health_metrics_and_a_clean_stop() -> None:
    dead = f"127.0.0.1:{free_port()}"
    metrics_port = free_port()
    worker = spawn(
        "gc",
        "--link-addr",
        dead,
        "--blob-addr",
        dead,
        "--interval",
        "0.2",
        "--metrics-port",
        str(metrics_port),
        "--log-level",
        "WARNING",
    )
    try:
        with grpc.insecure_channel(worker.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        deadline = time.monotonic() + 20
        while scrape(metrics_port).get('linkedblob_gc_runs_total{outcome="error"}', 0) < 2:
            assert time.monotonic() < deadline, "no failed runs counted"
            time.sleep(0.2)
    finally:
        code = worker.stop(signal.SIGTERM)
    assert code == 0, "".join(worker.output)
