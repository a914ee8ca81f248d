"""linksvc's domain logic (linksvc.store) against a real database, without gRPC: SQLite and
PostgreSQL (the db_url fixture). The store runs in the database's own SQL threads, as in the
server."""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from linkedblob.errors import LinkedBlobError, Reason
from linksvc import migrate
from linksvc.database import Database
from linksvc.lifecycle import LifecycleStore
from linksvc.models import SessionState
from linksvc.sessions import SessionRecord
from linksvc.store import LinkedBlob, LinkStore


def digest_of(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def push(
    store: LinkStore,
    repository: str,
    digest: str,
    media_type: str = "",
    size: int | None = None,
    finish_session_id: str = "",
) -> tuple[LinkedBlob, bool]:
    """A push's commit as the gateway makes it: a lease on the digest, then the link with it."""
    grant = LifecycleStore(store).lease(digest)
    return store.link(repository, digest, media_type, size, finish_session_id, grant.lease_id)


class Store:
    """Calls a LinkStore's (and its LifecycleStore's) methods in the database's SQL threads and
    waits for them."""

    def __init__(self, store: LinkStore) -> None:
        self.store = store
        self.db = store.db
        self.lifecycle = LifecycleStore(store)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        target = self.store if hasattr(self.store, name) else self.lifecycle
        method = getattr(target, name)
        return lambda *args: self.db.call(method, *args)

    def push(self, *args: Any) -> tuple[LinkedBlob, bool]:
        return self.db.call(push, self.store, *args)


def open_store(db_url: str, **options: Any) -> Store:
    return Store(LinkStore(Database(db_url, **options)))


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    migrate.upgrade(db_url)
    s = open_store(db_url, pool_size=4)
    yield s
    s.db.close()


def rows(db_url: str, table: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY 1"))]
    finally:
        engine.dispose()


def expect(code: grpc.StatusCode, reason: Reason, call: Callable[[], object]) -> LinkedBlobError:
    with pytest.raises(LinkedBlobError) as caught:
        call()
    assert (caught.value.code, caught.value.reason) == (code, reason), caught.value
    return caught.value


def test_record_and_stat_blob(store: Store) -> None:
    d = digest_of("a")
    before = datetime.now(UTC)
    # A new blob needs the lease its committer took (its bytes may be gone otherwise).
    expect(grpc.StatusCode.ABORTED, Reason.BLOB_UPLOAD_INVALID, lambda: store.record_blob(d, 10))
    assert store.record_blob(d, 10, store.lease(d, timedelta(minutes=1)).lease_id) is True
    assert store.record_blob(d, 10) is False  # idempotent
    err = expect(
        grpc.StatusCode.FAILED_PRECONDITION, Reason.SIZE_INVALID, lambda: store.record_blob(d, 11)
    )
    assert err.metadata == {"size": "10"}
    blob = store.stat_blob(d)
    assert (blob.digest, blob.size) == (d, 10)
    assert blob.created_at.tzinfo is not None
    assert before - timedelta(seconds=1) <= blob.created_at <= datetime.now(UTC)
    expect(grpc.StatusCode.NOT_FOUND, Reason.BLOB_UNKNOWN, lambda: store.stat_blob(digest_of("b")))


def test_link_records_and_links_in_one_transaction(store: Store, db_url: str) -> None:
    d = digest_of("layer")
    # Not recorded and no size: refused, and the repository is not created either.
    expect(grpc.StatusCode.NOT_FOUND, Reason.BLOB_UNKNOWN, lambda: store.link("r/one", d))
    assert rows(db_url, "repositories") == []

    assert store.push("r/one", d, "application/x-a", 5) == (
        LinkedBlob(d, 5, "application/x-a"),
        True,
    )
    assert store.stat_blob(d).size == 5
    assert store.resolve("r/one", d) == LinkedBlob(d, 5, "application/x-a")
    # Again: the same link, not created; the media type stays unless a new one is given.
    assert store.link("r/one", d, "", 5) == (LinkedBlob(d, 5, "application/x-a"), False)
    assert store.link("r/one", d) == (LinkedBlob(d, 5, "application/x-a"), False)
    assert store.link("r/one", d, "application/x-b") == (LinkedBlob(d, 5, "application/x-b"), False)
    assert store.resolve("r/one", d).media_type == "application/x-b"

    # A recorded blob links into another repository without a size; with a wrong size it
    # does not, and nothing of that transaction remains.
    assert store.link("r/two", d) == (LinkedBlob(d, 5, ""), True)
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.SIZE_INVALID,
        lambda: store.link("r/three", d, "", 6),
    )
    expect(grpc.StatusCode.NOT_FOUND, Reason.BLOB_UNKNOWN, lambda: store.resolve("r/three", d))
    assert [r[0] for r in rows(db_url, "repositories")] == ["r/one", "r/two"]


def test_link_finishes_its_upload_session(store: Store, db_url: str) -> None:
    d = digest_of("upload")
    session = store.create_session("r/a")
    # A session of another repository is unknown there; the link is not made either.
    expect(
        grpc.StatusCode.NOT_FOUND,
        Reason.BLOB_UPLOAD_UNKNOWN,
        lambda: store.push("r/b", d, "", 3, session.id),
    )
    expect(grpc.StatusCode.NOT_FOUND, Reason.BLOB_UNKNOWN, lambda: store.stat_blob(d))
    assert store.get_session(session.id).state == SessionState.ACTIVE

    descriptor, created = store.push("r/a", d, "", 3, session.id)
    assert (descriptor, created) == (LinkedBlob(d, 3, ""), True)
    finished = store.get_session(session.id)
    assert finished.state == SessionState.COMMITTED
    assert finished.updated_at >= session.updated_at
    # A retry after a lost answer is harmless.
    assert store.push("r/a", d, "", 3, session.id) == (LinkedBlob(d, 3, ""), False)

    cancelled = store.create_session("r/a")
    store.finish_session(cancelled.id, SessionState.CANCELLED)
    other = digest_of("other")
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.BLOB_UPLOAD_INVALID,
        lambda: store.push("r/a", other, "", 4, cancelled.id),
    )
    expect(grpc.StatusCode.NOT_FOUND, Reason.BLOB_UNKNOWN, lambda: store.stat_blob(other))
    expect(
        grpc.StatusCode.NOT_FOUND,
        Reason.BLOB_UPLOAD_UNKNOWN,
        lambda: store.push("r/a", other, "", 4, "no-such-session"),
    )
    assert [r[1] for r in rows(db_url, "links")] == [d]


def test_mount_unlink(store: Store) -> None:
    d = digest_of("mounted")
    store.push("src", d, "application/x-src", 7)
    # From a named source, and from any source; the media type comes from the source.
    assert store.mount("dst/one", "src", d) == (LinkedBlob(d, 7, "application/x-src"), True)
    assert store.mount("dst/two", "", d, "application/x-own") == (
        LinkedBlob(d, 7, "application/x-own"),
        True,
    )
    assert store.mount("dst/two", "src", d) == (LinkedBlob(d, 7, "application/x-own"), False)
    assert store.resolve("dst/one", d) == LinkedBlob(d, 7, "application/x-src")
    # A source that does not link the blob: nothing to mount.
    expect(grpc.StatusCode.NOT_FOUND, Reason.BLOB_UNKNOWN, lambda: store.mount("dst/x", "nope", d))
    unknown = digest_of("unknown")
    expect(
        grpc.StatusCode.NOT_FOUND, Reason.BLOB_UNKNOWN, lambda: store.mount("dst/x", "", unknown)
    )
    expect(grpc.StatusCode.NOT_FOUND, Reason.BLOB_UNKNOWN, lambda: store.resolve("dst/x", d))

    store.unlink("src", d)
    expect(grpc.StatusCode.NOT_FOUND, Reason.BLOB_UNKNOWN, lambda: store.resolve("src", d))
    expect(grpc.StatusCode.NOT_FOUND, Reason.BLOB_UNKNOWN, lambda: store.unlink("src", d))
    # Unlinking touches neither the blob record nor other repositories' links.
    assert store.stat_blob(d).size == 7
    assert store.resolve("dst/one", d).size == 7
    expect(grpc.StatusCode.NOT_FOUND, Reason.BLOB_UNKNOWN, lambda: store.mount("x", "src", d))
    assert store.mount("x", "", d)[1] is True  # dst/* still link it


def test_repeated_link_and_mount_with_a_new_media_type(store: Store) -> None:
    """The repeated calls: answered from the link as it stands, or updating its media type (on
    PostgreSQL the one-statement paths hand these over to the general one)."""
    d = digest_of("repeated")
    assert store.push("r", d, "a/one", 9) == (LinkedBlob(d, 9, "a/one"), True)
    assert store.link("r", d, "", 9) == (LinkedBlob(d, 9, "a/one"), False)
    assert store.link("r", d, "a/one", 9) == (LinkedBlob(d, 9, "a/one"), False)
    assert store.link("r", d, "a/two", 9) == (LinkedBlob(d, 9, "a/two"), False)
    assert store.resolve("r", d) == LinkedBlob(d, 9, "a/two")
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.SIZE_INVALID,
        lambda: store.link("r", d, "a/three", 10),
    )
    assert store.resolve("r", d) == LinkedBlob(d, 9, "a/two")

    assert store.mount("m", "r", d) == (LinkedBlob(d, 9, "a/two"), True)
    assert store.mount("m", "", d) == (LinkedBlob(d, 9, "a/two"), False)
    assert store.mount("m", "r", d, "a/two") == (LinkedBlob(d, 9, "a/two"), False)
    assert store.mount("m", "r", d, "a/mine") == (LinkedBlob(d, 9, "a/mine"), False)
    assert store.resolve("m", d) == LinkedBlob(d, 9, "a/mine")
    assert store.resolve("r", d) == LinkedBlob(d, 9, "a/two")  # the source keeps its own


def test_list_pages_in_bytewise_order(store: Store) -> None:
    digests = sorted(digest_of(f"blob-{i}") for i in range(25))
    for i, d in enumerate(digests):
        store.push("paged", d, "", i)
    store.link("other", digests[0])
    seen: list[str] = []
    after = ""
    while True:
        page, last = store.list_links("paged", after, 10)
        seen += [p.digest for p in page]
        if last is None:
            break
        assert last == page[-1].digest
        after = last
    assert seen == digests
    assert [len(store.list_links("paged", "", 10)[0]), store.list_links("paged", "", 25)[1]] == [
        10,
        None,
    ]

    # Names whose order differs between bytewise and natural-language collations.
    names = ["a-b", "a.b", "a_b", "a/b", "a0", "ab", "a__b", "a--b"]
    for name in names:
        store.link(name, digests[0])
    listed: list[str] = []
    after = ""
    while True:
        page_names, last_name = store.list_repositories(after, 3)
        listed += page_names
        if last_name is None:
            break
        after = last_name
    assert listed == sorted([*names, "paged", "other"])


def test_session_lifecycle(store: Store) -> None:
    session = store.create_session("r")
    assert len(session.id) >= 32 and session.state == SessionState.ACTIVE
    assert store.create_session("r").id != session.id
    assert store.get_session(session.id) == session

    advanced = store.advance_session(session.id, 0, 100)
    assert advanced.size == 100 and advanced.updated_at >= session.updated_at
    err = expect(
        grpc.StatusCode.ABORTED,
        Reason.BLOB_UPLOAD_INVALID,
        lambda: store.advance_session(session.id, 0, 50),
    )
    assert err.metadata == {"size": "100"}
    assert store.advance_session(session.id, 100, 100).size == 100

    done = store.finish_session(session.id, SessionState.COMMITTED)
    assert done.state == SessionState.COMMITTED
    assert store.finish_session(session.id, SessionState.COMMITTED) == done  # no-op
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.BLOB_UPLOAD_INVALID,
        lambda: store.finish_session(session.id, SessionState.CANCELLED),
    )
    expect(
        grpc.StatusCode.NOT_FOUND,
        Reason.BLOB_UPLOAD_UNKNOWN,
        lambda: store.advance_session(session.id, 100, 200),
    )
    unknown = secrets.token_urlsafe(24)
    for call in (
        lambda: store.get_session(unknown),
        lambda: store.advance_session(unknown, 0, 1),
        lambda: store.finish_session(unknown, SessionState.CANCELLED),
    ):
        expect(grpc.StatusCode.NOT_FOUND, Reason.BLOB_UPLOAD_UNKNOWN, call)

    store.purge_session(session.id)
    store.purge_session(session.id)  # idempotent
    expect(
        grpc.StatusCode.NOT_FOUND, Reason.BLOB_UPLOAD_UNKNOWN, lambda: store.get_session(session.id)
    )


def test_stale_sessions_oldest_first(store: Store) -> None:
    first = store.create_session("r")
    time.sleep(0.01)
    second = store.create_session("r")
    time.sleep(1.1)
    fresh = store.create_session("r")
    stale = store.list_stale_sessions(timedelta(seconds=1), 100)
    assert [s.id for s in stale] == [first.id, second.id]
    assert [s.id for s in store.list_stale_sessions(timedelta(0), 1)] == [first.id]
    # Advancing a session makes it fresh again.
    store.advance_session(first.id, 0, 1)
    assert [s.id for s in store.list_stale_sessions(timedelta(seconds=1), 100)] == [second.id]
    assert fresh.id in {s.id for s in store.list_stale_sessions(timedelta(0), 100)}


def race(db: Database, work: Callable[[int], object]) -> list[object]:
    """Runs ``work(i)`` in every SQL thread of ``db`` at once; returns results or errors."""
    barrier = threading.Barrier(db.pool_size)

    def run(i: int) -> object:
        barrier.wait(timeout=30)
        try:
            return work(i)
        except LinkedBlobError as err:
            return err

    futures = [db.executor.submit(run, i) for i in range(db.pool_size)]
    return [f.result() for f in futures]


def test_concurrent_links_of_one_pair_leave_one_row(db_url: str) -> None:
    migrate.upgrade(db_url)
    # Sixteen SQL threads, each on its own connection, released at once.
    s = open_store(db_url, pool_size=16)
    try:
        d = digest_of("contended")
        results = race(s.db, lambda i: push(s.store, "race/repo", d, "application/x-r", 42))
        assert all(isinstance(r, tuple) for r in results), results
        links = [r for r in results if isinstance(r, tuple)]
        assert sum(1 for _, created in links if created) == 1
        assert {descriptor for descriptor, _ in links} == {LinkedBlob(d, 42, "application/x-r")}
        assert len(rows(db_url, "links")) == 1
        assert len(rows(db_url, "blobs")) == 1
        assert len(rows(db_url, "repositories")) == 1
    finally:
        s.db.close()


def test_concurrent_links_of_one_new_blob_and_mounts_of_one_pair(db_url: str) -> None:
    migrate.upgrade(db_url)
    s = open_store(db_url, pool_size=16)
    try:
        # One new blob pushed into sixteen repositories at once: one blob row, sixteen links.
        d = digest_of("pushed everywhere")
        results = race(s.db, lambda i: push(s.store, f"race/{i}", d, "a/b", 42))
        assert results == [(LinkedBlob(d, 42, "a/b"), True)] * 16
        assert len(rows(db_url, "blobs")) == 1
        assert len(rows(db_url, "links")) == 16

        # Sixteen mounts of that blob into one new repository: one of them creates the link.
        results = race(s.db, lambda i: s.store.mount("race/target", f"race/{i}", d))
        assert all(isinstance(r, tuple) for r in results), results
        assert sum(1 for r in results if isinstance(r, tuple) and r[1]) == 1
        assert {r[0] for r in results if isinstance(r, tuple)} == {LinkedBlob(d, 42, "a/b")}
        assert len(rows(db_url, "links")) == 17
        assert len(rows(db_url, "repositories")) == 17
    finally:
        s.db.close()


def test_concurrent_advances_exactly_one_wins(db_url: str) -> None:
    migrate.upgrade(db_url)
    s = open_store(db_url, pool_size=8)
    try:
        session = s.create_session("race/repo")
        size = 0
        for _ in range(5):
            start = size

            def advance(i: int, start: int = start) -> object:
                return s.store.advance_session(session.id, start, start + 10 + i)

            results = race(s.db, advance)
            won = [r for r in results if isinstance(r, SessionRecord)]
            lost = [r for r in results if isinstance(r, LinkedBlobError)]
            assert len(won) == 1 and len(lost) == 7, results
            size = won[0].size
            assert start + 10 <= size < start + 18
            for err in lost:
                assert (err.code, err.reason) == (
                    grpc.StatusCode.ABORTED,
                    Reason.BLOB_UPLOAD_INVALID,
                ), err
                assert err.metadata == {"size": str(size)}
            assert s.get_session(session.id).size == size
    finally:
        s.db.close()


def terminate_connections(db_url: str) -> None:
    admin = sa.create_engine(db_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %(name)s AND pid <> pg_backend_pid()",
                {"name": sa.make_url(db_url).database},
            )
    finally:
        admin.dispose()


def test_a_busy_or_lost_database_is_unavailable(db_url: str) -> None:
    """Transient failures answer UNAVAILABLE (retry), change nothing, and the store recovers."""
    migrate.upgrade(db_url)
    s = open_store(db_url, pool_size=1, busy_timeout=0.2)
    try:
        d = digest_of("transient")
        s.push("r", d, "", 1)
        if db_url.startswith("sqlite"):
            # Another process holds SQLite's write lock longer than busy_timeout.
            holder = sqlite3.connect(sa.make_url(db_url).database or "", isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
            try:
                for call in (
                    lambda: s.link("r/new", d),
                    lambda: s.create_session("r"),
                    lambda: s.record_blob(digest_of("x"), 1),
                ):
                    expect(grpc.StatusCode.UNAVAILABLE, Reason.UNAVAILABLE, call)
                assert s.resolve("r", d).size == 1  # readers are not blocked (WAL)
            finally:
                holder.rollback()
                holder.close()
        else:
            # The server drops every connection of this database (a restart, a failover): the
            # next call on each path (the lean read, a transaction) fails, the one after works.
            for call in (lambda: s.resolve("r", d), lambda: s.link("r/new", d)):
                terminate_connections(db_url)
                expect(grpc.StatusCode.UNAVAILABLE, Reason.UNAVAILABLE, call)
                assert s.resolve("r", d).size == 1
        # The failed calls changed nothing; the next ones work.
        assert [r[0] for r in rows(db_url, "repositories")] == ["r"]
        assert s.link("r/new", d) == (LinkedBlob(d, 1, ""), True)
        assert s.resolve("r", d).size == 1
    finally:
        s.db.close()
