"""The races of garbage collection against links, mounts and leases, interleaved step by step
inside their transactions: on PostgreSQL (READ COMMITTED, where the blob's row lock decides) and
on SQLite (whose BEGIN IMMEDIATE serializes the writers). Two LinkStores on one database: the
pusher's and the collector's, each with its own connections.

A transaction is held right after it locked the blob's row (see ``pause_after_lock``); the other
one is started, shown to wait, and the first released. The invariant: a blob is never both
linked (or leased) and fenced for deletion.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy import event

from linkedblob.errors import LinkedBlobError, Reason
from linksvc import migrate
from linksvc.database import Database
from linksvc.lifecycle import LifecycleStore
from linksvc.models import BlobState
from linksvc.queries import DriverQuery
from linksvc.store import LinkStore

D = "sha256:" + hashlib.sha256(b"raced").hexdigest()
WAIT = 0.5  # long enough for a blocked statement to show it is blocked


@dataclass
class Side:
    """One LinkStore on its own Database (its own connections and SQL threads)."""

    links: LinkStore
    lifecycle: LifecycleStore

    def start(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return self.links.db.executor.submit(fn, *args)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.links.db.call(fn, *args)


@pytest.fixture
def sides(db_url: str) -> Iterator[tuple[Side, Side]]:
    migrate.upgrade(db_url)
    made = []
    for _ in range(2):
        store = LinkStore(Database(db_url, pool_size=2, busy_timeout=10))
        made.append(Side(store, LifecycleStore(store)))
    yield made[0], made[1]
    for side in made:
        side.links.db.close()


class Pause:
    """Holds the first statement that locks a blob's row, after it ran, until released."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()
        self.armed = True

    def hit(self) -> None:
        if self.armed:
            self.armed = False
            self.reached.set()
            assert self.go.wait(30)


def is_row_lock(sql: str) -> bool:
    """Queries.lock_blob and Queries.fence_lock (with or without FOR [NO KEY] UPDATE)."""
    return sql.startswith("SELECT blobs.size, blobs.state, blobs.version, blobs.updated_at")


def pause_after_lock(db: Database) -> Pause:
    """Holds this database's next row-locking statement, on the driver path (Database.execute)
    or through SQLAlchemy (an engine event)."""
    pause = Pause()
    execute = db.execute

    def paused_execute(conn: sa.Connection, query: DriverQuery, values: Any) -> Any:
        result = execute(conn, query, values)
        if is_row_lock(query.sql):
            pause.hit()
        return result

    db.execute = paused_execute  # type: ignore[method-assign]

    @event.listens_for(db.engine, "after_cursor_execute")
    def after(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if is_row_lock(statement):
            pause.hit()

    return pause


def rows(side: Side, sql: str) -> list[tuple[Any, ...]]:
    """Read on a connection of its own (the SQL threads hold the pool's)."""
    engine = sa.create_engine(side.links.db.url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql))]
    finally:
        engine.dispose()


def marked_blob(pusher: Side, collector: Side) -> int:
    """D pushed into "old", unlinked there, marked: the version the collector reads."""
    grant = pusher.call(pusher.lifecycle.lease, D)
    pusher.call(pusher.links.link, "old", D, "", 5, "", grant.lease_id)
    pusher.call(pusher.links.unlink, "old", D)
    assert collector.call(collector.lifecycle.mark_unreferenced) == (1, 0)
    (blob,), _ = collector.call(
        collector.lifecycle.list_collectable, timedelta(0), timedelta(0), "", 10
    )
    assert blob.state == BlobState.MARKED
    return int(blob.version)


def pusher_call(pusher: Side, kind: str) -> Future[Any]:
    """A re-link of D in another repository, in one of its forms."""
    links, lifecycle = pusher.links, pusher.lifecycle
    if kind == "link":  # a recorded blob linked again (a push that found it, a re-tag)
        return pusher.start(links.link, "new", D)
    if kind == "mount":  # from any repository
        return pusher.start(links.mount, "new", "", D)
    if kind == "lease":  # a push or commit about to write the bytes
        return pusher.start(lifecycle.lease, D)
    if kind == "lease-link":  # a push that would link the known blob at once
        return pusher.start(lifecycle.lease, D, timedelta(seconds=60), "new", "", 5)
    raise AssertionError(kind)


def links_of_d(side: Side) -> list[tuple[Any, ...]]:
    return rows(side, f"SELECT repository FROM links WHERE digest = '{D}'")


@pytest.mark.parametrize("kind", ["link", "mount", "lease", "lease-link"])
def test_the_fence_first_then_a_relink_waits_and_is_refused(
    sides: tuple[Side, Side], kind: str
) -> None:
    """Unlinked in one repository, marked; the collector fences it (and holds its transaction
    right after the row lock); meanwhile a re-link (link, mount, lease) of the digest comes. It
    must wait for the fence, then see the blob deleting: ABORTED / BLOB_DELETING."""
    pusher, collector = sides
    version = marked_blob(pusher, collector)
    pause = pause_after_lock(collector.links.db)
    fence = collector.start(collector.lifecycle.fence_blob, D, version)
    assert pause.reached.wait(10)
    relink = pusher_call(pusher, kind)
    time.sleep(WAIT)
    assert not relink.done(), f"{kind} did not wait for the fence: {relink.result()}"
    pause.go.set()
    fenced, blob = fence.result(10)
    assert fenced and blob.state == BlobState.DELETING
    err = relink.exception(10)
    assert isinstance(err, LinkedBlobError), err
    assert (err.code, err.reason) == (grpc.StatusCode.ABORTED, Reason.BLOB_DELETING)
    assert links_of_d(pusher) == []
    assert rows(pusher, "SELECT digest FROM blob_leases") == []


@pytest.mark.parametrize("kind", ["link", "lease", "lease-link"])
def test_a_relink_first_then_the_fence_waits_and_fences_nothing(
    sides: tuple[Side, Side], kind: str
) -> None:
    """The re-link holds its transaction right after the row lock; the collector's fence of the
    version it read must wait for it, then find the blob revived (or linked): not fenced."""
    pusher, collector = sides
    version = marked_blob(pusher, collector)
    pause = pause_after_lock(pusher.links.db)
    relink = pusher_call(pusher, kind)
    assert pause.reached.wait(10)
    fence = collector.start(collector.lifecycle.fence_blob, D, version)
    time.sleep(WAIT)
    assert not fence.done(), f"the fence did not wait for the {kind}: {fence.result()}"
    pause.go.set()
    relink.result(10)
    fenced, blob = fence.result(10)
    assert not fenced and blob.state == BlobState.ACTIVE and blob.version > version
    if kind == "lease":
        assert rows(pusher, "SELECT digest FROM blob_leases") == [(D,)]
    else:
        assert links_of_d(pusher) == [("new",)]
    # And the collector's next round leaves it alone.
    assert collector.call(collector.lifecycle.mark_unreferenced) == (0, 0)


def test_two_fences_of_one_version_exactly_one_wins(sides: tuple[Side, Side]) -> None:
    """Two collectors fence the version they both read: the second waits for the first's row
    lock, then finds a new version."""
    pusher, collector = sides
    version = marked_blob(pusher, collector)
    pause = pause_after_lock(collector.links.db)
    first = collector.start(collector.lifecycle.fence_blob, D, version)
    assert pause.reached.wait(10)
    second = pusher.start(pusher.lifecycle.fence_blob, D, version)
    time.sleep(WAIT)
    assert not second.done()
    pause.go.set()
    results = [first.result(10), second.result(10)]
    assert [fenced for fenced, _ in results] == [True, False]
    assert results[1][1].version == results[0][1].version == version + 1
    # Only the winner's version forgets the row.
    assert collector.call(collector.lifecycle.forget_blob, D, version) is False
    assert collector.call(collector.lifecycle.forget_blob, D, version + 1) is True
    assert rows(pusher, "SELECT digest FROM blobs") == []


def test_many_fences_and_relinks_at_once(sides: tuple[Side, Side]) -> None:
    """Released together (a barrier) rather than ordered: whatever the order, a fenced blob has
    no link and every successful re-link left the blob active."""
    pusher, collector = sides
    for round_ in range(5):
        version = (
            marked_blob(pusher, collector)
            if round_ == 0
            else relinked_and_marked(pusher, collector)
        )
        barrier = threading.Barrier(4)

        def fence(side: Side, version: int = version, barrier: threading.Barrier = barrier) -> Any:
            barrier.wait(10)
            return side.lifecycle.fence_blob(D, version)

        def relink(side: Side, repository: str, barrier: threading.Barrier = barrier) -> Any:
            barrier.wait(10)
            try:
                return side.links.link(repository, D)
            except LinkedBlobError as err:
                return err

        futures = [
            collector.start(fence, collector),
            pusher.start(fence, pusher),
            collector.start(relink, collector, "new-a"),
            pusher.start(relink, pusher, "new-b"),
        ]
        (f1, _), (f2, _), r1, r2 = [f.result(20) for f in futures]
        assert not (f1 and f2)
        linked = [r for r in (r1, r2) if not isinstance(r, LinkedBlobError)]
        state = rows(pusher, f"SELECT state FROM blobs WHERE digest = '{D}'")
        if f1 or f2:
            assert linked == [] and links_of_d(pusher) == [] and state == [("deleting",)]
            for r in (r1, r2):
                assert isinstance(r, LinkedBlobError) and r.reason == Reason.BLOB_DELETING
            return
        assert len(linked) == 2 and state == [("active",)]


def relinked_and_marked(pusher: Side, collector: Side) -> int:
    for repository in ("new-a", "new-b"):
        pusher.call(pusher.links.unlink, repository, D)
    assert collector.call(collector.lifecycle.mark_unreferenced) == (1, 0)
    (blob,), _ = collector.call(
        collector.lifecycle.list_collectable, timedelta(0), timedelta(0), "", 10
    )
    return int(blob.version)
