"""linksvc end to end, the server: concurrency, database failures, locking, metrics, migrations."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from concurrent.futures import Future

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from linkedblob.errors import Reason, error_info
from linkedblob.link.v1 import link_pb2 as pb
from linkedblob.link.v1 import link_pb2_grpc
from tests.linksvc_service_helpers import (
    BIN,
    SERVICE,
    Code,
    digest_of,
    lease,
    linksvc,
    refused,
    snapshot,
    sqlite_url,
    stub,
)
from tests.services import running
from tests.stack import free_port, scrape

# pytest finds fixtures by name in the test module: these are the module's.
FIXTURES = (linksvc, sqlite_url, stub)


def test_concurrent_calls(db_url: str, stub: link_pb2_grpc.LinkServiceStub) -> None:
    d = digest_of("contended")
    # 16 links of one pair at once (recording the blob too): one row, one "created", no error.
    futures: list[Future[pb.LinkResponse]] = [
        stub.Link.future(  # type: ignore[misc]
            pb.LinkRequest(repository="race/r", digest=d, size=7, lease_id=lease_id)
        )
        for lease_id in [lease(stub, d) for _ in range(16)]
    ]
    answers = [f.result() for f in futures]
    assert sum(a.created for a in answers) == 1
    assert {(a.blob.digest, a.blob.size) for a in answers} == {(d, 7)}
    rows = snapshot(db_url)
    assert len(rows["links"]) == len(rows["blobs"]) == len(rows["repositories"]) == 1

    # Advances of one session from the same size: exactly one wins each round.
    session = stub.CreateSession(pb.CreateSessionRequest(repository="race/r"))
    size = 0
    for _ in range(4):
        attempts = [
            stub.AdvanceSession.future(  # type: ignore[misc]
                pb.AdvanceSessionRequest(id=session.id, from_size=size, to_size=size + 1 + i)
            )
            for i in range(8)
        ]
        won: list[pb.Session] = []
        lost: list[grpc.RpcError] = []
        for attempt in attempts:
            try:
                won.append(attempt.result())
            except grpc.RpcError as err:
                lost.append(err)
        assert len(won) == 1, lost
        size = won[0].size
        for failure in lost:
            info = error_info(failure)
            assert failure.code() == Code.ABORTED and info is not None  # type: ignore[attr-defined]
            assert (info.reason, dict(info.metadata)) == (
                Reason.BLOB_UPLOAD_INVALID,
                {"size": str(size)},
            )
    assert stub.GetSession(pb.GetSessionRequest(id=session.id)).size == size


def test_transient_database_failure_is_unavailable(db_url: str) -> None:
    d = digest_of("transient")
    with (
        running("link", "--db", db_url, "--migrate", "--db-busy-timeout", "0.2") as svc,
        svc.channel() as channel,
    ):
        stub = link_pb2_grpc.LinkServiceStub(channel)
        stub.Link(pb.LinkRequest(repository="r", digest=d, size=1, lease_id=lease(stub, d)))
        if db_url.startswith("sqlite"):
            holder = sqlite3.connect(sa.make_url(db_url).database or "", isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")  # the write lock, held past busy_timeout
            try:
                refused(
                    lambda: stub.Link(pb.LinkRequest(repository="r/2", digest=d)),
                    Code.UNAVAILABLE,
                    Reason.UNAVAILABLE,
                )
                refused(
                    lambda: stub.CreateSession(pb.CreateSessionRequest(repository="r")),
                    Code.UNAVAILABLE,
                    Reason.UNAVAILABLE,
                )
                assert stub.Resolve(pb.ResolveRequest(repository="r", digest=d)).blob.size == 1
            finally:
                holder.rollback()
                holder.close()
            assert stub.Link(pb.LinkRequest(repository="r/2", digest=d)).created
        else:
            # The database goes away under the server: connections dropped, none to be had.
            server = os.environ["LINKEDBLOB_TEST_PG"]
            admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
            try:
                with admin.connect() as conn:
                    name = sa.make_url(db_url).database
                    conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
            finally:
                admin.dispose()
            for call in (
                lambda: stub.Resolve(pb.ResolveRequest(repository="r", digest=d)),
                lambda: stub.Link(pb.LinkRequest(repository="r/2", digest=d)),
            ):
                refused(call, Code.UNAVAILABLE, Reason.UNAVAILABLE)
        assert svc.proc.poll() is None  # still serving


@pytest.mark.parametrize("mode", [[], ["--sqlite-threads-only"]], ids=["on-loop", "threads"])
def test_sqlite_writes_wait_for_the_lock_while_reads_go_on(
    sqlite_url: str, mode: list[str]
) -> None:
    """SQLite's short calls run on the event loop (or, with --sqlite-threads-only, in the SQL
    threads). A write that finds the lock taken waits for it in a SQL thread and then succeeds;
    meanwhile the event loop serves other calls."""
    d = digest_of("locked")
    args = ["--db", sqlite_url, "--migrate", "--db-busy-timeout", "60", *mode]
    with running("link", *args) as svc, svc.channel() as channel:
        stub = link_pb2_grpc.LinkServiceStub(channel)
        stub.Link(
            pb.LinkRequest(
                repository="src", digest=d, size=5, media_type="a/b", lease_id=lease(stub, d)
            )
        )
        new_lease = lease(stub, digest_of("new"))
        holder = sqlite3.connect(sa.make_url(sqlite_url).database or "", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process's write lock
        try:
            link = stub.Link.future(  # type: ignore[misc]
                pb.LinkRequest(
                    repository="dst/link", digest=digest_of("new"), size=3, lease_id=new_lease
                )
            )
            mount = stub.Mount.future(  # type: ignore[misc]
                pb.MountRequest(repository="dst/mount", from_repository="src", digest=d)
            )
            session = stub.CreateSession.future(  # type: ignore[misc]
                pb.CreateSessionRequest(repository="dst/session")
            )
            for _ in range(20):  # reads are served while the writes wait
                assert stub.Resolve(pb.ResolveRequest(repository="src", digest=d)).blob.size == 5
            assert not (link.done() or mount.done() or session.done())
        finally:
            holder.rollback()
            holder.close()
        assert link.result().created
        assert mount.result().created and mount.result().blob.media_type == "a/b"
        assert session.result().state == pb.Session.ACTIVE
        assert stub.Resolve(pb.ResolveRequest(repository="dst/link", digest=digest_of("new")))


def test_calls_are_counted_by_method_and_code(sqlite_url: str) -> None:
    """The servicer wrapper's metrics (linkedblob.rpc.records_metrics), scraped from the server:
    calls by method and code, and their latency histogram by method."""
    port = free_port()
    args = ["--db", sqlite_url, "--migrate", "--metrics-port", str(port)]
    with running("link", *args) as svc, svc.channel() as channel:
        stub = link_pb2_grpc.LinkServiceStub(channel)
        d = digest_of("counted")
        stub.Link(pb.LinkRequest(repository="r", digest=d, size=1, lease_id=lease(stub, d)))
        for _ in range(3):
            stub.Resolve(pb.ResolveRequest(repository="r", digest=d))
        for _ in range(2):
            refused(
                lambda: stub.Resolve(pb.ResolveRequest(repository="r/none", digest=d)),
                Code.NOT_FOUND,
                Reason.BLOB_UNKNOWN,
            )
        refused(
            lambda: stub.Resolve(pb.ResolveRequest(repository="R", digest=d)),
            Code.INVALID_ARGUMENT,
            Reason.NAME_INVALID,
        )
        samples = scrape(port)
    assert (
        samples[
            'grpc_server_handled_total{grpc_code="OK",grpc_method="Resolve",grpc_service="linkedblob.link.v1.LinkService",grpc_type="unary"}'
        ]
        == 3
    )
    assert (
        samples[
            'grpc_server_handled_total{grpc_code="NOT_FOUND",grpc_method="Resolve",grpc_service="linkedblob.link.v1.LinkService",grpc_type="unary"}'
        ]
        == 2
    )
    assert (
        samples[
            'grpc_server_handled_total{grpc_code="INVALID_ARGUMENT",grpc_method="Resolve",grpc_service="linkedblob.link.v1.LinkService",grpc_type="unary"}'
        ]
        == 1
    )
    assert (
        samples[
            'grpc_server_handled_total{grpc_code="OK",grpc_method="Link",grpc_service="linkedblob.link.v1.LinkService",grpc_type="unary"}'
        ]
        == 1
    )
    assert (
        samples[
            'grpc_server_handling_seconds_count{grpc_method="Resolve",'
            'grpc_service="linkedblob.link.v1.LinkService",grpc_type="unary"}'
        ]
        == 6
    )
    assert (
        samples[
            'grpc_server_handling_seconds_count{grpc_method="Link",'
            'grpc_service="linkedblob.link.v1.LinkService",grpc_type="unary"}'
        ]
        == 1
    )


def test_migrate_on_serve_refuses_a_database_a_newer_linksvc_migrated(db_url: str) -> None:
    """--migrate runs alembic in a child process; its failure still stops the server, with
    alembic's reason."""
    cmd = [
        str(BIN / "linkedblob"),
        "serve",
        "link",
        "--port",
        "0",
        "--open",
        "--db",
        db_url,
        "--migrate",
    ]
    with running("link", "--db", db_url, "--migrate"):
        pass  # migrated to head
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    finally:
        engine.dispose()
    refused_run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert refused_run.returncode == 1
    assert "cannot open" in refused_run.stderr and "9999_future" in refused_run.stderr
    assert "listening" not in refused_run.stdout


def test_serve_refuses_an_unmigrated_database(db_url: str) -> None:
    cmd = [str(BIN / "linkedblob"), "serve", "link", "--port", "0", "--open", "--db", db_url]
    refused_run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert refused_run.returncode != 0
    assert "linkedblob migrate" in refused_run.stderr
    assert "listening" not in refused_run.stdout

    migrated = subprocess.run(
        [str(BIN / "linkedblob"), "migrate", "--db", db_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert migrated.returncode == 0, migrated.stderr

    with running("link", "--db", db_url) as svc, svc.channel() as channel:
        listing = subprocess.run(
            [str(BIN / "grpcurl"), "-plaintext", svc.address, "list"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listing.returncode == 0, listing.stderr
        assert SERVICE in listing.stdout.split()
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            answer = health.Check(health_pb2.HealthCheckRequest(service=name))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        stub = link_pb2_grpc.LinkServiceStub(channel)
        assert not stub.ListRepositories(pb.ListRepositoriesRequest()).repositories
