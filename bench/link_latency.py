"""Latency of linksvc's hot calls over gRPC, on SQLite and on PostgreSQL.

Starts a real ``linkedblob serve link --migrate`` on a temporary SQLite file and on a temporary
PostgreSQL database (created here, dropped after), then times, one call at a time from a sync
gRPC client on one channel:

- Resolve: (repository, digest) -> descriptor, the read behind every gateway stat;
- Link (new): record a new blob with its size and link it, one transaction (a push's commit);
- Link (again): the same link repeated (idempotent; nothing to write);
- and, as the floor, grpc.health.v1 Health.Check on the same server: the gRPC hop alone.

    python bench/link_latency.py                      # both databases, 2000 calls each
    python bench/link_latency.py --db sqlite --calls 5000
    LINKEDBLOB_TEST_PG=postgresql+psycopg://postgres@127.0.0.1:5432/postgres \
        python bench/link_latency.py --db postgresql

PostgreSQL's server comes from --pg (default: $LINKEDBLOB_TEST_PG, else the local trust-auth
server); without one reachable, only SQLite is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from linkedblob.link.v1 import link_pb2, link_pb2_grpc

_READY = re.compile(r"^linkedblob link listening on (\S+)$")
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def linksvc(db_url: str, pool_size: int) -> Iterator[tuple[str, psutil.Process]]:
    """A `linkedblob serve link` process on ``db_url``; yields its address and process."""
    cmd = [
        sys.executable,
        "-m",
        "linkedblob.cli",
        "serve",
        "link",
        "--port",
        "0",
        "--db",
        db_url,
        "--migrate",
        "--db-pool-size",
        str(pool_size),
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout is not None
    address = ""
    for line in proc.stdout:
        m = _READY.match(line.strip())
        if m:
            address = m.group(1)
            break
    if not address:
        raise SystemExit(f"linksvc exited with {proc.wait()} before it was ready")
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    try:
        yield address, psutil.Process(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@contextlib.contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="link-bench-") as tmp:
        yield f"sqlite:///{Path(tmp) / 'link.db'}"


@contextlib.contextmanager
def postgresql_database(server: str) -> Iterator[str]:
    name = f"linkedblob_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def pg_reachable(server: str) -> bool:
    engine = sa.create_engine(
        server, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 3}
    )
    try:
        with engine.connect():
            return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


def digest_of(i: int) -> str:
    return "sha256:" + hashlib.sha256(f"link-bench-{i}".encode()).hexdigest()


def timed(calls: int, warmup: int, call: Callable[[int], object]) -> list[float]:
    for i in range(warmup):
        call(-1 - i)
    samples = []
    for i in range(calls):
        started = time.perf_counter_ns()
        call(i)
        samples.append((time.perf_counter_ns() - started) / 1e6)
    return samples


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def summary(samples: list[float], server_cpu: float) -> str:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return (
        f"p50 {q[49]:6.3f} ms   p90 {q[89]:6.3f} ms   p99 {q[98]:6.3f} ms   "
        f"mean {statistics.fmean(samples):6.3f} ms   "
        f"server CPU {server_cpu / len(samples) * 1e6:5.0f} us/call"
    )


def measure(label: str, db_url: str, calls: int, warmup: int, pool_size: int) -> None:
    with linksvc(db_url, pool_size) as (address, server), grpc.insecure_channel(address) as channel:
        stub = link_pb2_grpc.LinkServiceStub(channel)
        repo = "bench/resolve"
        hot = digest_of(10**9)
        stub.Link(link_pb2.LinkRequest(repository=repo, digest=hot, size=1234, media_type="a/b"))

        def resolve(_: int) -> object:
            return stub.Resolve(link_pb2.ResolveRequest(repository=repo, digest=hot))

        def link_new(i: int) -> object:
            # Warm-up calls get negative i: distinct digests all the same.
            return stub.Link(
                link_pb2.LinkRequest(
                    repository="bench/link", digest=digest_of(i + warmup + 1), size=1 + abs(i)
                )
            )

        def link_again(_: int) -> object:
            return stub.Link(link_pb2.LinkRequest(repository=repo, digest=hot, size=1234))

        health = health_pb2_grpc.HealthStub(channel)

        def health_check(_: int) -> object:
            return health.Check(health_pb2.HealthCheckRequest(service=""))

        print(f"{label}: {calls} calls each after {warmup} warm-up calls, one at a time")
        for name, call in (
            ("Health.Check", health_check),
            ("Resolve", resolve),
            ("Link (new)", link_new),
            ("Link (again)", link_again),
        ):
            cpu_before = cpu_seconds(server)
            samples = timed(calls, warmup, call)
            used = cpu_seconds(server) - cpu_before
            print(f"  {name:<13} {summary(samples, used * calls / (calls + warmup))}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--pg", default=os.environ.get("LINKEDBLOB_TEST_PG") or DEFAULT_PG)
    args = parser.parse_args()

    if args.db in ("sqlite", "both"):
        with sqlite_database() as url:
            measure("SQLite (WAL, synchronous=FULL)", url, args.calls, args.warmup, args.pool_size)
    if args.db in ("postgresql", "both"):
        if not pg_reachable(args.pg):
            print(f"PostgreSQL at {sa.make_url(args.pg)!r} is not reachable: skipped")
            return 0 if args.db == "both" else 1
        with postgresql_database(args.pg) as url:
            measure("PostgreSQL (psycopg 3)", url, args.calls, args.warmup, args.pool_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
