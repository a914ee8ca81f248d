"""The garbage collector's costs: mark time and sweep rate on many unlinked blobs, and push
throughput with `serve gc` looping against without it.

1. **Mark and sweep** (on SQLite and on PostgreSQL): a real ``linkedblob serve blob`` and
   ``linkedblob serve link --migrate`` (PostgreSQL: a database made for the run, dropped after).
   The blobs are populated *bypassing the API*, for speed: tiny distinct files written straight
   into blobsvc's filesystem layout (ROOT/blobs/sha256/<2 hex>/<hex>) and their index rows
   (state active, nothing linking them) inserted with SQL in bulk (linksvc.models.blobs). Then,
   over gRPC as `linkedblob gc` runs it (collector.grpc_backends): MarkUnreferenced is timed
   (every row becomes marked), then one full run of collector.runner.Runner with a grace of 0
   (purge, mark again, sweep: FenceBlob, blobsvc Delete, ForgetBlob per blob, one at a time)
   reclaims them all; the sweep rate is blobs reclaimed per second of that run. Every file must
   be gone afterwards.
2. **Push throughput with GC looping**: two ``linkedblob up`` (SQLite, filesystem) side by
   side, one with ``--no-gc`` and one with its collector looping (``--gc-interval 1s
   --gc-grace 0``); rounds alternate between them so a shared machine's load falls on both
   alike. A round pushes ``--push-mib`` blobs of distinct bytes one after another with
   linkedblob.client (direct to blobsvc, as `up` offers it), deleting each after its push (so
   the looping collector reclaims a big blob while the next one is pushed), while a second
   client pushes and deletes small blobs all along (churn: work for every mark and sweep). The
   figure is MiB/s over the timed pushes only; the ratio is with GC / without (target >= 0.9).

    python -m bench.gc                  # 100,000 blobs, 256 MiB pushes x 4 per round, 3 rounds
    python -m bench.gc --quick          # a tiny version (a few hundred blobs, 8 MiB pushes)
    python -m bench.gc --db sqlite --blobs 20000 --no-push

PostgreSQL's server comes from --pg (default $LINKEDBLOB_TEST_PG, else the local trust-auth
server); without one reachable, that column says so.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from bench.linkedblob_side import DEFAULT_PG, QUIET, admin_execute, postgres_reachable
from bench.procs import Process
from collector.grpc_backends import GrpcBlobStorage, GrpcLinkIndex
from collector.runner import DAY, Options, Runner
from linkedblob.client import Client
from linkedblob.up import GRANT_SECRET_ENV

MiB = 1024 * 1024
INSERT_BATCH = 5000
ROWS = (
    "blobs populated",
    "mark: MarkUnreferenced (s)",
    "mark rate (blobs/s)",
    "sweep: full gc run, grace 0 (s)",
    "sweep rate (blobs/s)",
)
# `up`'s ready line (with or without ", gc running" after linksvc's address).
UP_READY = re.compile(r"^linkedblob is up: gateway (\S+) ")
PUSH_ROWS = (
    "push without gc (MiB/s)",
    "push with gc looping (MiB/s)",
    "ratio with/without",
    "blob files left (without / with gc)",
)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "linkedblob.cli", *args]


def _open(kind: str) -> list[str]:
    """The measured services serve on loopback without authentication (`serve gc` has none)."""
    return ["--open"] if kind in ("blob", "link", "gateway") else []


def serve(
    workdir: Path, kind: str, *args: str, env: dict[str, str] | None = None
) -> tuple[Process, str]:
    """`linkedblob serve KIND` on a free port; the process and its address."""
    process = Process(
        f"linkedblob {kind}",
        _cli("serve", kind, "--host", "127.0.0.1", "--port", "0", *_open(kind), *args),
        workdir / f"{kind}.log",
        env={**QUIET, **(env or {})},
    )
    try:
        ready = process.wait_ready(re.compile(rf"^linkedblob {kind} listening on (\S+)$"))
    except BaseException:
        process.stop()
        raise
    return process, ready.group(1)


@contextlib.contextmanager
def database(kind: str, workdir: Path, pg: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'link.db'}"
        return
    name = f"linkedblob_bench_{secrets.token_hex(6)}"
    admin_execute(pg, f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(pg).set(database=name).render_as_string(hide_password=False)
    finally:
        admin_execute(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def populate(root: Path, db_url: str, count: int) -> None:
    """``count`` tiny distinct blobs: files in blobsvc's layout and active rows that nothing
    links (bypassing the API)."""
    from linksvc import models

    now = datetime.now(UTC)
    for shard in range(256):
        (root / "blobs" / "sha256" / f"{shard:02x}").mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        rows: list[dict[str, object]] = []
        for i in range(count):
            data = f"linkedblob gc bench blob {i}\n".encode()
            hex_digest = hashlib.sha256(data).hexdigest()
            (root / "blobs" / "sha256" / hex_digest[:2] / hex_digest).write_bytes(data)
            rows.append(
                {
                    "digest": f"sha256:{hex_digest}",
                    "size": len(data),
                    "state": "active",
                    "created_at": now,
                    "updated_at": now,
                    "version": 0,
                }
            )
            if len(rows) == INSERT_BATCH or i == count - 1:
                with engine.begin() as conn:
                    conn.execute(models.blobs.insert(), rows)
                rows = []
    finally:
        engine.dispose()


def stored_files(root: Path) -> int:
    return sum(1 for p in (root / "blobs").glob("*/*/*") if p.is_file())


def mark_and_sweep(kind: str, count: int, pg: str) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="gc-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        secret = secrets.token_urlsafe(32)
        db_url = stack.enter_context(database(kind, workdir, pg))
        link, link_addr = serve(workdir, "link", "--db", db_url, "--migrate")
        stack.callback(link.stop)
        root = workdir / "blobs"
        began = time.perf_counter()
        populate(root, db_url, count)
        populated = time.perf_counter() - began
        blob, blob_addr = serve(
            workdir, "blob", "--data", str(root), env={GRANT_SECRET_ENV: secret}
        )
        stack.callback(blob.stop)
        links = GrpcLinkIndex(link_addr, timeout=600)
        blobs = GrpcBlobStorage(blob_addr, secret)
        stack.callback(links.close)
        stack.callback(blobs.close)

        began = time.perf_counter()
        marked = links.mark_unreferenced().marked
        mark_seconds = time.perf_counter() - began
        if marked != count:
            raise SystemExit(f"{kind}: MarkUnreferenced marked {marked} of {count} blobs")
        runner = Runner(links, blobs, Options(grace=0, upload_expiry=DAY))
        stats = runner.run()
        if stats.outcome != "ok" or stats.reclaimed_blobs != count:
            raise SystemExit(f"{kind}: the gc run reclaimed {stats.reclaimed_blobs}: {stats}")
        left = stored_files(root)
        if left:
            raise SystemExit(f"{kind}: {left} blob files left after the sweep")
        print(
            f"  {kind}: populated {count} blobs in {populated:.1f}s (bypassing the API); "
            f"marked in {mark_seconds:.2f}s; gc run {stats.duration:.1f}s, "
            f"{stats.reclaimed_blobs} reclaimed, {left} files left",
            flush=True,
        )
        return {
            ROWS[0]: f"{count}",
            ROWS[1]: f"{mark_seconds:.2f}",
            ROWS[2]: f"{count / mark_seconds:.0f}",
            ROWS[3]: f"{stats.duration:.1f}",
            ROWS[4]: f"{stats.reclaimed_blobs / stats.duration:.0f}",
        }


@dataclass
class Up:
    """A `linkedblob up` and the seconds and bytes pushed to it."""

    label: str
    process: Process
    address: str
    data: Path
    seconds: float = 0.0
    pushed: int = 0
    churn: list[int] = field(default_factory=lambda: [0])

    @property
    def rate(self) -> float:
        return self.pushed / MiB / self.seconds if self.seconds else 0.0

    def files(self) -> int:
        """Blob files on disk (every big push and small one was deleted after it)."""
        return stored_files(self.data / "blobs")


def start_up(workdir: Path, label: str, gc: bool) -> Up:
    workdir.mkdir()
    looping = ["--gc-interval", "1", "--gc-grace", "0"] if gc else ["--no-gc"]
    argv = _cli("up", "--data", str(workdir / "data"), "--port", "0", "--blob-port", "0")
    argv += ["--link-port", "0", "--enable-delete", *looping]
    process = Process(f"linkedblob up ({label})", argv, workdir / "up.log", env=QUIET)
    try:
        ready = process.wait_ready(UP_READY)
    except BaseException:
        process.stop()
        raise
    return Up(label, process, ready.group(1), workdir / "data")


def churn(up: Up, stop: threading.Event) -> None:
    """Small pushes, each deleted again: unlinked blobs for every mark and sweep."""
    with Client(up.address) as client:
        while not stop.is_set():
            digest = client.push("bench/churn", os.urandom(64 * 1024)).digest
            client.delete("bench/churn", digest)
            up.churn[0] += 1
            stop.wait(0.05)


def push_round(up: Up, data: bytearray, pushes: int) -> None:
    stop = threading.Event()
    churner = threading.Thread(target=churn, args=(up, stop))
    churner.start()
    try:
        with Client(up.address) as client:
            for _ in range(pushes):
                data[:16] = secrets.token_bytes(16)  # distinct bytes, a new blob every time
                payload = bytes(data)
                began = time.perf_counter()
                digest = client.push("bench/big", payload).digest
                up.seconds += time.perf_counter() - began
                up.pushed += len(payload)
                client.delete("bench/big", digest)
                del payload
    finally:
        stop.set()
        churner.join()


def push_throughput(size: int, pushes: int, rounds: int) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="gc-bench-up-") as tmp:
        workdir = Path(tmp)
        ups: list[Up] = []
        try:
            ups.append(start_up(workdir / "nogc", "without gc", gc=False))
            ups.append(start_up(workdir / "gc", "with gc looping", gc=True))
            data = bytearray(os.urandom(size))
            for r in range(rounds):
                # Alternate which goes first, so neither always follows the other.
                for up in ups if r % 2 == 0 else ups[::-1]:
                    push_round(up, data, pushes)
            without, with_gc = ups
            time.sleep(2)  # the collector's next run takes the last deleted blobs
            left = [up.files() for up in ups]
            for up in ups:
                print(
                    f"  {up.label}: {up.pushed // MiB} MiB in {up.seconds:.1f}s "
                    f"({up.rate:.0f} MiB/s), {up.churn[0]} small pushes deleted meanwhile",
                    flush=True,
                )
        finally:
            for up in ups:
                up.process.stop(timeout=90)
    return {
        PUSH_ROWS[0]: f"{without.rate:.0f}",
        PUSH_ROWS[1]: f"{with_gc.rate:.0f}",
        PUSH_ROWS[2]: f"{with_gc.rate / without.rate:.2f}x",
        PUSH_ROWS[3]: f"{left[0]} / {left[1]}",
    }


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny version (seconds)")
    parser.add_argument("--blobs", type=int, help="unlinked blobs to mark and sweep (100000)")
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--pg", default=os.environ.get("LINKEDBLOB_TEST_PG") or DEFAULT_PG)
    parser.add_argument("--push-mib", type=int, help="size of one timed push in MiB (256)")
    parser.add_argument("--pushes", type=int, help="timed pushes per round (4)")
    parser.add_argument("--rounds", type=int, help="rounds per system, alternating (3)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the mark and sweep part")
    parser.add_argument("--no-push", action="store_true", help="skip the push part")
    args = parser.parse_args(argv)
    count = args.blobs or (300 if args.quick else 100_000)
    size = (args.push_mib or (8 if args.quick else 256)) * MiB
    pushes = args.pushes or (2 if args.quick else 4)
    rounds = args.rounds or (1 if args.quick else 3)

    print(f"linkedblob collector benchmark{' (quick)' if args.quick else ''}", flush=True)
    columns: dict[str, dict[str, str]] = {}
    if not args.no_sweep:
        print(
            f"mark and sweep of {count} unlinked blobs (population bypassed the API: files "
            "written into blobsvc's layout, index rows inserted with SQL)",
            flush=True,
        )
        kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
        for kind in kinds:
            label = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}[kind]
            why = postgres_reachable(args.pg) if kind == "postgresql" else None
            if why is not None:
                print(f"  {kind}: not reachable at {sa.make_url(args.pg)!r}: {why}", flush=True)
                columns[label] = dict.fromkeys(ROWS, "n/a")
                continue
            columns[label] = mark_and_sweep(kind, count, args.pg)
    if not args.no_push:
        print(
            f"push throughput on linkedblob up: {pushes} x {size // MiB} MiB per round, "
            f"{rounds} round(s) per system, alternating; gc looping every 1s at grace 0",
            flush=True,
        )
        columns["linkedblob up"] = push_throughput(size, pushes, rounds)

    print()
    for group in (ROWS, PUSH_ROWS):
        shown = [name for name, col in columns.items() if group[0] in col]
        if shown:
            rows = [("measure", *shown)] + [
                (row, *(columns[name][row] for name in shown)) for row in group
            ]
            print(table(rows))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
