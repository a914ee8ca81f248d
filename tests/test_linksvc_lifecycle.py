"""The data lifecycle's rules in linksvc's store (linksvc.store, linksvc.lifecycle), one by one,
on SQLite and PostgreSQL: leases, what Link / Mount / Lease / RecordBlob do with a marked or a
deleting blob, marking, listing, fencing, forgetting, adopting and the runner lock. (The races
are in test_linksvc_races.)"""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import sqlalchemy as sa

from linkedblob.errors import Reason
from linksvc.lifecycle import IndexedBlob
from linksvc.models import BlobState, SessionState
from linksvc.store import LinkedBlob
from tests.test_linksvc_store import Store, digest_of, expect, rows, store

FIXTURES = (store,)
ABORTED, NF = grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND
MINUTE = timedelta(minutes=1)
ZERO = timedelta(0)


def blob(store: Store, digest: str) -> IndexedBlob:
    found = [b for b in store.list_blobs("", 1000)[0] if b.digest == digest]
    assert found, digest
    return found[0]


def execute(db_url: str, sql: str, **params: Any) -> None:
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(sql), params)
    finally:
        engine.dispose()


def marked(store: Store, digest: str, size: int = 3) -> IndexedBlob:
    """``digest`` pushed into "old", unlinked and marked."""
    store.push("old", digest, "", size)
    store.unlink("old", digest)
    store.mark_unreferenced()
    found = blob(store, digest)
    assert found.state == BlobState.MARKED
    return found


def deleting(store: Store, digest: str) -> IndexedBlob:
    fenced, found = store.fence_blob(digest, marked(store, digest).version)
    assert fenced and found.state == BlobState.DELETING
    return found


def test_a_new_blob_needs_a_live_lease_of_its_digest(store: Store, db_url: str) -> None:
    d, other = digest_of("leased"), digest_of("other")
    before = datetime.now(UTC)
    grant = store.lease(d, MINUTE)
    assert len(grant.lease_id) >= 32 and grant.linked is None
    assert before + MINUTE <= grant.expires_at <= datetime.now(UTC) + MINUTE
    assert store.lease(d, MINUTE).lease_id != grant.lease_id  # one per commit in flight

    # No lease, an unknown one, one of another digest: refused, nothing recorded.
    for lease_id in ("", "no-such-lease", store.lease(other, MINUTE).lease_id):
        err = expect(
            ABORTED,
            Reason.BLOB_UPLOAD_INVALID,
            functools.partial(store.link, "r", d, "", 3, "", lease_id),
        )
        assert "upload again" in err.message
    expect(NF, Reason.BLOB_UNKNOWN, lambda: store.stat_blob(d))
    # Without a size there is nothing to record: unknown, as before; the lease stays.
    expect(NF, Reason.BLOB_UNKNOWN, lambda: store.link("r", d, "", None, "", grant.lease_id))

    assert store.link("r", d, "a/b", 3, "", grant.lease_id) == (LinkedBlob(d, 3, "a/b"), True)
    assert grant.lease_id not in {r[0] for r in rows(db_url, "blob_leases")}  # consumed
    assert blob(store, d).state == BlobState.ACTIVE and blob(store, d).version == 0
    # A recorded blob links without a lease; a lease given is consumed all the same.
    spare = store.lease(d, MINUTE).lease_id
    assert store.link("r2", d, "", 3, "", spare) == (LinkedBlob(d, 3, ""), True)
    assert spare not in {r[0] for r in rows(db_url, "blob_leases")}
    assert store.link("r3", d) == (LinkedBlob(d, 3, ""), True)


def test_an_expired_lease_neither_records_nor_protects(store: Store, db_url: str) -> None:
    d = digest_of("expired")
    short = store.lease(d, timedelta(milliseconds=50))
    time.sleep(0.1)
    # The bytes it protected may be gone: upload again.
    expect(
        ABORTED, Reason.BLOB_UPLOAD_INVALID, lambda: store.link("r", d, "", 3, "", short.lease_id)
    )
    expect(NF, Reason.BLOB_UNKNOWN, lambda: store.stat_blob(d))

    # A live lease keeps a blob from being marked and fenced; once expired it does not.
    assert store.adopt_blob(d, 3) is True  # marked
    lease = store.lease(d, timedelta(milliseconds=300))
    revived = blob(store, d)
    assert revived.state == BlobState.ACTIVE and revived.version == 1  # the lease revived it
    assert store.mark_unreferenced() == (0, 0)
    execute(db_url, "UPDATE blobs SET state = 'marked', version = 5")  # a mark that raced
    assert store.fence_blob(d, 5) == (False, blob(store, d))  # the live lease protects it
    time.sleep(0.4)
    assert lease.lease_id in {r[0] for r in rows(db_url, "blob_leases")}
    fenced, after = store.fence_blob(d, 5)  # expired leases are ignored
    assert fenced and after.state == BlobState.DELETING and after.version == 6
    # Housekeeping deletes the expired ones.
    store.mark_unreferenced()
    assert rows(db_url, "blob_leases") == []


def test_release_lease_drops_only_that_lease_and_is_idempotent(store: Store, db_url: str) -> None:
    """ReleaseLease: the holder gives back a lease it will not use (its call failed before the
    link). Only that lease goes, by its id and digest; others of the same digest (other commits
    in flight) stay and keep protecting it; releasing again, or a lease consumed, expired and
    swept, or named with another digest, changes nothing."""
    d, other = digest_of("released"), digest_of("released elsewhere")
    mine, theirs = store.lease(d, MINUTE).lease_id, store.lease(d, MINUTE).lease_id
    elsewhere = store.lease(other, MINUTE).lease_id

    assert store.release_lease(other, mine) is False  # not a lease of that digest
    assert store.release_lease(d, elsewhere) is False
    assert store.release_lease(d, "no-such-lease-anywhere-0123456789") is False
    assert {r[0] for r in rows(db_url, "blob_leases")} == {mine, theirs, elsewhere}

    assert store.release_lease(d, mine) is True
    assert {r[0] for r in rows(db_url, "blob_leases")} == {theirs, elsewhere}
    assert store.release_lease(d, mine) is False  # again: nothing changes
    assert {r[0] for r in rows(db_url, "blob_leases")} == {theirs, elsewhere}
    # The released lease records nothing any more; the other commit's still does.
    expect(ABORTED, Reason.BLOB_UPLOAD_INVALID, lambda: store.link("r", d, "", 3, "", mine))
    assert store.link("r", d, "", 3, "", theirs) == (LinkedBlob(d, 3, ""), True)
    assert store.release_lease(d, theirs) is False  # consumed by the link

    # The blob the other digest's lease protects is still protected by it; once released, the
    # collector may mark it.
    assert store.adopt_blob(other, 5) is True  # marked...
    store.lease(other, MINUTE)  # ...revived by a lease, then given back at once
    assert blob(store, other).state == BlobState.ACTIVE
    assert store.mark_unreferenced() == (0, 0)  # two live leases of it
    for lease in [r[0] for r in rows(db_url, "blob_leases") if r[1] == other]:
        assert store.release_lease(other, lease) is True
    assert store.mark_unreferenced() == (1, 0)
    assert blob(store, other).state == BlobState.MARKED

    # An expired lease is released too (housekeeping would have swept it).
    short = store.lease(d, timedelta(milliseconds=10)).lease_id
    time.sleep(0.05)
    assert store.release_lease(d, short) is True
    assert rows(db_url, "blob_leases") == []


def test_lease_links_a_live_blob_at_once(store: Store, db_url: str) -> None:
    d = digest_of("known")
    store.push("src", d, "a/src", 7)
    grant = store.lease(d, MINUTE, "dst", "a/dst", 7)
    assert grant.lease_id == "" and grant.expires_at is None
    assert grant.linked == (LinkedBlob(d, 7, "a/dst"), True)
    assert store.lease(d, MINUTE, "dst", "", None).linked == (LinkedBlob(d, 7, "a/dst"), False)
    assert store.lease(d, MINUTE, "dst", "a/new", 7).linked == (LinkedBlob(d, 7, "a/new"), False)
    assert store.resolve("dst", d) == LinkedBlob(d, 7, "a/new")
    assert rows(db_url, "blob_leases") == []
    err = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.SIZE_INVALID,
        lambda: store.lease(d, MINUTE, "other", "", 8),
    )
    assert err.metadata == {"size": "7"}
    expect(NF, Reason.BLOB_UNKNOWN, lambda: store.resolve("other", d))
    # Not recorded: a lease, no link.
    new = digest_of("new")
    taken = store.lease(new, MINUTE, "dst", "", 3)
    assert taken.linked is None and taken.lease_id
    expect(NF, Reason.BLOB_UNKNOWN, lambda: store.resolve("dst", new))


def test_a_marked_blob_is_revived_by_link_mount_lease_and_record(store: Store) -> None:
    for i, revive in enumerate(
        [
            lambda d: store.link("new", d),
            lambda d: store.push("new", d, "", 3),
            lambda d: store.lease(d, MINUTE),
            lambda d: store.lease(d, MINUTE, "new", "", 3),
            lambda d: store.record_blob(d, 3),  # recorded already: no lease needed
        ]
    ):
        d = digest_of(f"revived {i}")
        before = marked(store, d)
        revive(d)
        after = blob(store, d)
        assert (after.state, after.version) == (BlobState.ACTIVE, before.version + 1), i
        assert after.since >= before.since
        assert store.fence_blob(d, before.version)[0] is False
    # A mount needs a source: a marked blob linked nowhere is not mountable, and stays marked.
    d = digest_of("unmountable")
    before = marked(store, d)
    expect(NF, Reason.BLOB_UNKNOWN, lambda: store.mount("new", "", d))
    assert blob(store, d) == before


def test_a_blob_being_deleted_is_refused_everywhere(store: Store, db_url: str) -> None:
    d = digest_of("deleting")
    fenced = deleting(store, d)
    kept = store.lease(digest_of("unrelated"), MINUTE).lease_id
    for name, call in [
        ("link", lambda: store.link("new", d)),
        ("link with size", lambda: store.link("new", d, "", 3, "", kept)),
        ("mount", lambda: store.mount("new", "", d)),
        ("lease", lambda: store.lease(d, MINUTE)),
        ("lease and link", lambda: store.lease(d, MINUTE, "new", "", 3)),
        ("record", lambda: store.record_blob(d, 3)),
    ]:
        err = expect(ABORTED, Reason.BLOB_DELETING, call)
        assert "being deleted" in err.message, name
    assert blob(store, d) == fenced
    assert [r[0] for r in rows(db_url, "blob_leases")] == [kept]  # a refused link keeps it
    # Once forgotten, the digest is new again: lease, upload, link.
    assert store.forget_blob(d, fenced.version) is True
    assert store.push("new", d, "", 3) == (LinkedBlob(d, 3, ""), True)


def test_mark_unreferenced(store: Store, db_url: str) -> None:
    linked, unlinked, leased = digest_of("linked"), digest_of("unlinked"), digest_of("leased")
    for d in (linked, unlinked, leased):
        store.push("r", d, "", 1)
    store.unlink("r", unlinked)
    store.unlink("r", leased)
    store.lease(leased, MINUTE)
    expired = store.lease(digest_of("gone"), timedelta(milliseconds=10)).lease_id
    time.sleep(0.05)
    assert store.mark_unreferenced() == (1, 0)
    assert {b.digest: b.state for b in store.list_blobs("", 10)[0]} == {
        linked: BlobState.ACTIVE,
        unlinked: BlobState.MARKED,
        leased: BlobState.ACTIVE,
    }
    assert expired not in {r[0] for r in rows(db_url, "blob_leases")}
    assert store.mark_unreferenced() == (0, 0)  # marked once; the version does not move
    assert blob(store, unlinked).version == 1
    # A mark that raced a link (set-based, on an old snapshot) is undone by the next round.
    execute(db_url, "UPDATE blobs SET state = 'marked' WHERE digest = :d", d=linked)
    assert store.mark_unreferenced() == (0, 1)
    assert blob(store, linked).state == BlobState.ACTIVE


def test_list_collectable_after_grace_and_takeover(store: Store, db_url: str) -> None:
    digests = sorted(digest_of(f"c{i}") for i in range(5))
    for d in digests:
        marked(store, d)
    stuck = deleting(store, digest_of("stuck"))
    assert store.list_collectable(MINUTE, MINUTE, "", 10) == ([], None)
    page, last = store.list_collectable(ZERO, MINUTE, "", 2)
    assert [b.digest for b in page] == digests[:2] and last == digests[1]
    assert all(b.state == BlobState.MARKED and b.version == 1 for b in page)
    rest, last = store.list_collectable(ZERO, MINUTE, last, 10)
    assert [b.digest for b in rest] == digests[2:] and last is None
    everything, _ = store.list_collectable(ZERO, ZERO, "", 10)
    assert stuck in everything and len(everything) == 6
    execute(db_url, "UPDATE blobs SET updated_at = :t", t=datetime.now(UTC) - 2 * MINUTE)
    assert len(store.list_collectable(MINUTE, MINUTE, "", 10)[0]) == 6


def test_fence_blob(store: Store, db_url: str) -> None:
    d = digest_of("fenced")
    assert store.fence_blob(d, 0) == (False, None)  # not indexed
    store.push("r", d, "", 3)
    active = blob(store, d)
    assert store.fence_blob(d, active.version) == (False, active)  # active: never
    store.unlink("r", d)
    store.mark_unreferenced()
    m = blob(store, d)
    assert store.fence_blob(d, m.version + 1) == (False, m)  # another version: unchanged
    # Linked again without the mark undone (a raced mark): back to active, a new version.
    execute(db_url, "INSERT INTO links VALUES ('r', :d, '', :t)", d=d, t=datetime.now(UTC))
    fenced, back = store.fence_blob(d, m.version)
    assert not fenced and (back.state, back.version) == (BlobState.ACTIVE, m.version + 1)
    store.unlink("r", d)
    store.mark_unreferenced()
    m = blob(store, d)
    fenced, f = store.fence_blob(d, m.version)
    assert fenced and (f.state, f.version) == (BlobState.DELETING, m.version + 1)
    assert f == blob(store, d)
    # A takeover: a deleting blob is fenced again with its version (a new version, new since).
    fenced, again = store.fence_blob(d, f.version)
    assert fenced and again.version == f.version + 1 and again.since >= f.since
    assert store.fence_blob(d, f.version) == (False, again)


def test_forget_and_adopt(store: Store, db_url: str) -> None:
    d = digest_of("forgotten")
    f = deleting(store, d)
    assert store.forget_blob(d, f.version - 1) is False
    # A lease that raced the fence goes with the row: its bytes are gone.
    execute(db_url, "INSERT INTO blob_leases VALUES ('raced', :d, :t, :t)", d=d,
            t=datetime.now(UTC) + MINUTE)  # fmt: skip
    assert store.forget_blob(d, f.version) is True
    assert store.forget_blob(d, f.version) is False  # idempotent
    assert rows(db_url, "blob_leases") == []
    expect(ABORTED, Reason.BLOB_UPLOAD_INVALID, lambda: store.link("r", d, "", 3, "", "raced"))
    # Only a deleting blob is forgotten.
    m = marked(store, digest_of("marked"))
    assert store.forget_blob(m.digest, m.version) is False

    orphan = digest_of("orphan")
    assert store.adopt_blob(orphan, 9) is True
    adopted = blob(store, orphan)
    assert (adopted.state, adopted.size, adopted.version) == (BlobState.MARKED, 9, 0)
    assert store.adopt_blob(orphan, 9) is False
    err = expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.SIZE_INVALID,
        lambda: store.adopt_blob(orphan, 8),
    )
    assert err.metadata == {"size": "9"}
    assert store.adopt_blob(m.digest, 3) is False  # recorded: left as it is
    assert blob(store, m.digest) == m


def test_list_blobs_pages_in_digest_order(store: Store) -> None:
    digests = sorted(digest_of(f"b{i}") for i in range(7))
    for d in digests:
        store.adopt_blob(d, 1)
    seen, after = [], ""
    while True:
        page, last = store.list_blobs(after, 3)
        seen += [b.digest for b in page]
        if last is None:
            break
        after = last
    assert seen == digests


def test_runner_lock(store: Store) -> None:
    first = store.acquire_runner_lock("gc", "runner-1", MINUTE)
    assert first.acquired and first.holder == "runner-1"
    taken = store.acquire_runner_lock("gc", "runner-2", MINUTE)
    assert (taken.acquired, taken.holder, taken.expires_at) == (False, "runner-1", first.expires_at)
    renewed = store.acquire_runner_lock("gc", "runner-1", 2 * MINUTE)
    assert renewed.acquired and renewed.expires_at > first.expires_at
    assert store.acquire_runner_lock("other", "runner-2", MINUTE).acquired  # another name
    store.release_runner_lock("gc", "runner-2")  # not its holder: nothing
    assert store.acquire_runner_lock("gc", "runner-2", MINUTE).holder == "runner-1"
    store.release_runner_lock("gc", "runner-1")
    store.release_runner_lock("gc", "runner-1")  # idempotent
    assert store.acquire_runner_lock("gc", "runner-2", timedelta(milliseconds=50)).acquired
    time.sleep(0.1)  # expired: free for anyone
    assert store.acquire_runner_lock("gc", "runner-3", MINUTE).holder == "runner-3"


def test_every_session_write_refreshes_updated_at(store: Store) -> None:
    """Idle expiry counts from the last write: AdvanceSession (even to the same size) and
    finishing refresh updated_at."""
    session = store.create_session("r")
    time.sleep(0.02)
    advanced = store.advance_session(session.id, 0, 10)
    assert advanced.updated_at > session.updated_at
    time.sleep(0.02)
    same = store.advance_session(session.id, 10, 10)
    assert same.updated_at > advanced.updated_at
    assert store.list_stale_sessions(timedelta(milliseconds=10), 10) == []
    time.sleep(0.02)
    finished = store.finish_session(session.id, SessionState.COMMITTED)
    assert finished.updated_at > same.updated_at
