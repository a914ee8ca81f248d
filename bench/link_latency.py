"""Latency of linksvc's hot calls over gRPC, on SQLite and on PostgreSQL.

Starts a real ``linkedblob serve link --migrate`` on a temporary SQLite file and on a temporary
PostgreSQL database (created here, dropped after), then times, from a sync gRPC client on one
channel (as the gateway has one channel per backend):

- Health.Check: grpc.health.v1 on the same server, the floor: the gRPC hop alone;
- Resolve: (repository, digest) -> descriptor, the read behind every gateway stat;
- Lease (new): a lease on a digest nobody recorded (the first step of every push's commit);
- Link (new): record a new blob with its size and link it, consuming the lease taken for it
  (one transaction: a push's commit; the Lease call is made beforehand, untimed);
- Link (again): the same link repeated (idempotent; nothing to write);
- Mount (new): link a blob another repository links into a new repository (a durable write);
- Mount (again): the same mount repeated.

Calls go one at a time by default; ``--threads N`` runs N client threads at once on the channel
(p50 per call and calls/s in total: blocking the server's event loop shows up here).

``--variant NAME:VAR=VALUE,...`` (repeatable) starts one server per variant with those
environment variables, and alternates the variants batch by batch so that a shared machine's
load falls on all of them alike (A/B of a server setting)::

    python bench/link_latency.py                      # both databases, 2000 calls each
    python bench/link_latency.py --db sqlite --calls 5000 --threads 8
    python bench/link_latency.py --db sqlite --variant asyncio:LINKEDBLOB_EVENT_LOOP=asyncio \\
        --variant uvloop:LINKEDBLOB_EVENT_LOOP=uvloop
    LINKEDBLOB_TEST_PG=postgresql+psycopg://postgres@127.0.0.1:5432/postgres \\
        python bench/link_latency.py --db postgresql

PostgreSQL's server comes from --pg (default: $LINKEDBLOB_TEST_PG, else the local trust-auth
server); without one reachable, only SQLite is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
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
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from linkedblob.link.v1 import link_pb2, link_pb2_grpc

_READY = re.compile(r"^linkedblob link listening on (\S+)$")
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
CALLS = (
    "Health.Check",
    "Resolve",
    "Lease (new)",
    "Link (new)",
    "Link (again)",
    "Mount (new)",
    "Mount (again)",
)


@contextlib.contextmanager
def linksvc(
    db_url: str, pool_size: int, env: dict[str, str]
) -> Iterator[tuple[str, psutil.Process]]:
    """A `linkedblob serve link` process on ``db_url``; yields its address and process."""
    cmd = [
        sys.executable,
        "-m",
        "linkedblob.cli",
        "serve",
        "link",
        "--port",
        "0",
        "--open",
        "--db",
        db_url,
        "--migrate",
        "--db-pool-size",
        str(pool_size),
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, bufsize=1, env={**os.environ, **env}
    )
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


def digest_of(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


@dataclass
class Results:
    samples: list[float] = field(default_factory=list)  # ms per call
    wall: float = 0.0  # seconds the batches took
    server_cpu: float = 0.0  # seconds of server CPU over the batches


class Target:
    """One running server (a variant) and the calls to time against it."""

    def __init__(self, address: str, process: psutil.Process) -> None:
        self.process = process
        self.channel = grpc.insecure_channel(address)
        self.stub = link_pb2_grpc.LinkServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.serial = itertools.count()  # distinct digests / repositories for the "new" calls
        self.resolved = digest_of("bench/hot")
        self.stub.Link(
            link_pb2.LinkRequest(
                repository="bench/resolve",
                digest=self.resolved,
                size=1234,
                media_type="a/b",
                lease_id=self.lease(self.resolved),
            )
        )
        self.results = {name: Results() for name in CALLS}

    def lease(self, digest: str) -> str:
        """A lease on ``digest``, as the gateway takes one before it commits new bytes: a Link
        that records a new blob must consume a live one."""
        return str(self.stub.Lease(link_pb2.LeaseRequest(digest=digest)).lease_id)

    def call(self, name: str) -> Callable[[], object]:
        """A fresh call of the kind ``name`` (new names and digests for the "new" kinds)."""
        stub, hot = self.stub, self.resolved
        if name == "Health.Check":
            request = health_pb2.HealthCheckRequest(service="")
            return lambda: self.health.Check(request)
        if name == "Resolve":
            resolve = link_pb2.ResolveRequest(repository="bench/resolve", digest=hot)
            return lambda: stub.Resolve(resolve)
        if name == "Lease (new)":
            lease = link_pb2.LeaseRequest(digest=digest_of(f"lease-{next(self.serial)}"))
            return lambda: stub.Lease(lease)
        if name == "Link (new)":
            n = next(self.serial)
            digest = digest_of(f"new-{n}")
            new = link_pb2.LinkRequest(
                repository="bench/link", digest=digest, size=1 + n, lease_id=self.lease(digest)
            )
            return lambda: stub.Link(new)
        if name == "Link (again)":
            again = link_pb2.LinkRequest(repository="bench/resolve", digest=hot, size=1234)
            return lambda: stub.Link(again)
        if name == "Mount (new)":
            n = next(self.serial)
            mount = link_pb2.MountRequest(
                repository=f"bench/mount/{n}", from_repository="bench/resolve", digest=hot
            )
            return lambda: stub.Mount(mount)
        if name == "Mount (again)":
            remount = link_pb2.MountRequest(
                repository="bench/mount/again", from_repository="bench/resolve", digest=hot
            )
            return lambda: stub.Mount(remount)
        raise ValueError(name)

    def batch(self, name: str, calls: int, threads: int, record: bool) -> None:
        """``calls`` calls of one kind, over ``threads`` client threads at once."""
        per_thread = max(1, calls // threads)
        prepared = [[self.call(name) for _ in range(per_thread)] for _ in range(threads)]
        lists: list[list[float]] = [[] for _ in range(threads)]
        start = threading.Barrier(threads + 1)

        def work(i: int) -> None:
            out = lists[i]
            start.wait()
            for call in prepared[i]:
                began = time.perf_counter_ns()
                call()
                out.append((time.perf_counter_ns() - began) / 1e6)

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        cpu_before = cpu_seconds(self.process)
        began = time.perf_counter()
        start.wait()
        for w in workers:
            w.join()
        if record:
            result = self.results[name]
            result.wall += time.perf_counter() - began
            result.server_cpu += cpu_seconds(self.process) - cpu_before
            for out in lists:
                result.samples.extend(out)

    def close(self) -> None:
        self.channel.close()


def summary(result: Results, threads: int) -> str:
    q = statistics.quantiles(result.samples, n=100, method="inclusive")
    n = len(result.samples)
    rate = f"   {n / result.wall:6.0f} calls/s" if threads > 1 else ""
    return (
        f"p50 {q[49]:6.3f} ms   p90 {q[89]:6.3f} ms   p99 {q[98]:6.3f} ms   "
        f"server CPU {result.server_cpu / n * 1e6:5.0f} us/call{rate}"
    )


def measure(
    label: str,
    databases: Callable[[], contextlib.AbstractContextManager[str]],
    variants: list[tuple[str, dict[str, str]]],
    args: argparse.Namespace,
) -> None:
    with contextlib.ExitStack() as stack:
        targets: list[tuple[str, Target]] = []
        for name, env in variants:
            url = stack.enter_context(databases())
            address, process = stack.enter_context(linksvc(url, args.pool_size, env))
            target = Target(address, process)
            stack.callback(target.close)
            targets.append((name, target))
        kinds = [c for c in CALLS if not args.only or any(o in c for o in args.only)]
        rounds = max(1, args.rounds)
        batch = max(1, args.calls // rounds)
        for _, target in targets:
            for kind in kinds:
                target.batch(kind, args.warmup, args.threads, record=False)
        for _ in range(rounds):
            for kind in kinds:
                for _, target in targets:
                    target.batch(kind, batch, args.threads, record=True)
        how = "one at a time" if args.threads == 1 else f"{args.threads} client threads at once"
        print(
            f"{label}: {batch * rounds} calls each in {rounds} alternating batches after "
            f"{args.warmup} warm-up calls, {how}"
        )
        for kind in kinds:
            for name, target in targets:
                shown = f"{kind} [{name}]" if len(targets) > 1 else kind
                print(f"  {shown:<30} {summary(target.results[kind], args.threads)}", flush=True)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    env = dict(a.split("=", 1) for a in assignments.split(",") if a)
    return name, env


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls of each kind")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10, help="batches the calls are split in")
    parser.add_argument("--threads", type=int, default=1, help="client threads calling at once")
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--only", action="append", help="only the calls whose name has this")
    parser.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        help="NAME:VAR=VALUE,... a server with these environment variables (repeatable)",
    )
    parser.add_argument("--pg", default=os.environ.get("LINKEDBLOB_TEST_PG") or DEFAULT_PG)
    args = parser.parse_args()
    variants = args.variant or [("", {})]

    if args.db in ("sqlite", "both"):
        measure("SQLite (WAL, synchronous=FULL)", sqlite_database, variants, args)
    if args.db in ("postgresql", "both"):
        if not pg_reachable(args.pg):
            print(f"PostgreSQL at {sa.make_url(args.pg)!r} is not reachable: skipped")
            return 0 if args.db == "both" else 1
        measure(
            "PostgreSQL (psycopg 3)",
            lambda: postgresql_database(args.pg),
            variants,
            args,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
