"""The data lifecycle of linksvc (docs/design.md#lifecycle): leases that protect a commit in
flight, and the calls of garbage collection and fsck (mark, list, fence, forget, adopt, list all)
and the collectors' runner lock.

Row locks decide, never the runner lock: every transaction here that changes a blob's fate locks
the blob's row first (``Queries.lock_blob`` / ``fence_lock``: SELECT ... FOR [NO KEY] UPDATE on
PostgreSQL under READ COMMITTED; SQLite's BEGIN IMMEDIATE serializes writers), then reads links
and leases in later statements, which see everything that committed before the lock was granted.
Link, Mount and Lease take the same lock (linksvc.store), so a fence and a link of one blob
never overlap: whichever comes second sees what the first did.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from linkedblob.errors import Reason, failed_precondition, invalid_argument
from linksvc.database import map_errors
from linksvc.models import BlobState
from linksvc.sessions import utcnow
from linksvc.store import LinkedBlob, LinkStore

DEFAULT_LEASE_TTL = timedelta(seconds=600)


@dataclass(frozen=True, slots=True)
class IndexedBlob:
    """A blob of the index as garbage collection and fsck see it."""

    digest: str
    size: int
    state: BlobState
    since: datetime  # when it entered its state
    version: int


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """What Lease did: took a lease (``lease_id``, ``expires_at``) or linked at once."""

    lease_id: str = ""
    expires_at: datetime | None = None
    linked: tuple[LinkedBlob, bool] | None = None


@dataclass(frozen=True, slots=True)
class RunnerLock:
    acquired: bool
    holder: str  # the holder now ("" when nobody holds it)
    expires_at: datetime | None


def new_lease_id() -> str:
    """192 random bits, URL-safe."""
    return secrets.token_urlsafe(24)


def _size_differs(digest: str, recorded: int, size: int) -> Exception:
    return invalid_argument(
        Reason.SIZE_INVALID,
        f"blob {digest} is recorded with size {recorded}, not {size}",
        size=recorded,
    )


def _indexed(row: Any) -> IndexedBlob:
    return IndexedBlob(row.digest, row.size, BlobState(row.state), row.updated_at, row.version)


class LifecycleStore:
    """Leases and garbage collection, on the LinkStore's database and statements."""

    def __init__(self, links: LinkStore) -> None:
        self.links = links
        self.db = links.db
        self.q = links.q

    # --- leases (the gateway, before it commits bytes in blobsvc) ----------------------------

    @map_errors
    def lease(
        self,
        digest: str,
        ttl: timedelta = DEFAULT_LEASE_TTL,
        link_repository: str = "",
        media_type: str = "",
        size: int | None = None,
    ) -> LeaseGrant:
        """Protects ``digest`` from the fence for ``ttl``; with ``link_repository`` and a live
        recorded blob, links it instead. A marked blob is revived (so the collector's version
        no longer matches); one being deleted is ABORTED / BLOB_DELETING."""
        now = utcnow()
        db, d = self.db, self.q.driver
        if d.lease_one is not None:
            grant = LeaseGrant(new_lease_id(), now + ttl)
            row = db.fetch_one(
                d.lease_one,
                {"digest": digest, "repository": link_repository, "size": size,
                 "media_type": media_type, "lease_id": grant.lease_id, "now": now,
                 "expires_at": grant.expires_at},
            )  # fmt: skip
            assert row is not None  # the statement always answers one row
            state, recorded, leased, created, existing_media_type = row
            if leased:
                return grant
            if state == BlobState.ACTIVE:
                if size is not None and size != recorded:
                    raise _size_differs(digest, recorded, size)
                if created:
                    return LeaseGrant(linked=(LinkedBlob(digest, recorded, media_type), True))
                if existing_media_type is not None and media_type in ("", existing_media_type):
                    as_it_was = LinkedBlob(digest, recorded, existing_media_type)
                    return LeaseGrant(linked=(as_it_was, False))
            # Marked, deleting, or the link's media type changes: the general path.
        with db.transaction() as conn:
            recorded = self.links.lock_live(conn, digest, now)
            if link_repository and recorded is not None:
                if size is not None and size != recorded:
                    raise _size_differs(digest, recorded, size)
                linked = self.links.link_locked(conn, link_repository, digest, media_type, recorded)
                return LeaseGrant(linked=linked)
            grant = LeaseGrant(new_lease_id(), now + ttl)
            db.execute(
                conn,
                d.add_lease,
                {"id": grant.lease_id, "digest": digest, "created_at": now,
                 "expires_at": grant.expires_at},
            )  # fmt: skip
        return grant

    @map_errors
    def release_lease(self, digest: str, lease_id: str) -> bool:
        """Removes the lease ``lease_id`` of ``digest`` (live or expired), which its holder
        will not use; True when there was one. One statement on the lease's primary key: other
        leases of the digest are untouched, and the blob's row is neither locked nor changed
        (a fence that comes after sees one lease fewer, which is all a release means)."""
        values = {"lease_id": lease_id, "digest": digest}
        with self.db.connect() as conn:
            return bool(self.db.execute(conn, self.q.driver.release_lease, values).rowcount)

    # --- garbage collection -------------------------------------------------------------

    @map_errors
    def mark_unreferenced(self) -> tuple[int, int]:
        """Deletes expired leases; marks active blobs with no link and no live lease; revives
        marked blobs that are linked. Returns (marked, revived). Set-based, one statement each:
        a wrong mark is harmless (the fence re-checks under the row lock, a link revives)."""
        now = utcnow()
        with self.db.connect() as conn:
            conn.execute(self.q.expire_leases, {"now": now})
            marked = conn.execute(self.q.mark, {"now": now}).rowcount
            revived = conn.execute(self.q.unmark, {"now": now}).rowcount
        return marked, revived

    @map_errors
    def list_collectable(
        self, grace: timedelta, takeover: timedelta, after: str, limit: int
    ) -> tuple[list[IndexedBlob], str | None]:
        """Marked for at least ``grace`` and deleting for at least ``takeover``, in digest
        order after ``after``; and the last digest when more follow."""
        now = utcnow()
        params = {
            "marked_before": now - grace,
            "deleting_before": now - takeover,
            "after": after,
            "limit": limit + 1,
        }
        with self.db.connect() as conn:
            rows = conn.execute(self.q.collectable, params).all()
        page = [_indexed(r) for r in rows[:limit]]
        return page, (page[-1].digest if len(rows) > limit else None)

    @map_errors
    def fence_blob(self, digest: str, version: int) -> tuple[bool, IndexedBlob | None]:
        """Fences one blob for deletion if it still has ``version``, is marked (or deleting: a
        takeover), has no link and no live lease. Returns whether it did, and the blob as it is
        now (None: not indexed)."""
        now = utcnow()
        q = self.q
        with self.db.transaction() as conn:
            # FOR UPDATE: waits for every link, mount and lease of this blob in flight (they hold
            # FOR NO KEY UPDATE), and for the foreign-key checks of links being inserted.
            row = conn.execute(q.fence_lock, {"digest": digest}).first()
            if row is None:
                return False, None
            blob = IndexedBlob(digest, row.size, BlobState(row.state), row.updated_at, row.version)
            if row.version != version or blob.state == BlobState.ACTIVE:
                return False, blob
            # Fresh statements: they see every link and lease committed before the lock.
            if conn.execute(q.has_link, {"digest": digest}).first() is not None:
                return False, self._set_state(conn, digest, BlobState.ACTIVE, now)
            if conn.execute(q.has_live_lease, {"digest": digest, "now": now}).first() is not None:
                return False, blob
            return True, self._set_state(conn, digest, BlobState.DELETING, now)

    def _set_state(
        self, conn: sa.Connection, digest: str, state: BlobState, now: datetime
    ) -> IndexedBlob:
        row = conn.execute(
            self.q.set_state, {"p_digest": digest, "p_state": state.value, "now": now}
        ).one()
        return IndexedBlob(digest, row.size, BlobState(row.state), row.updated_at, row.version)

    @map_errors
    def forget_blob(self, digest: str, version: int) -> bool:
        """Removes a fenced blob's row if it still has ``version``. Its leases go too: any that
        exists now was taken while the row was absent and the fence could not see it uncommitted
        (PostgreSQL), and the bytes it protected are gone; Link then refuses it (upload again)."""
        with self.db.transaction() as conn:
            forgotten = conn.execute(self.q.forget, {"digest": digest, "version": version}).rowcount
            if forgotten:
                conn.execute(self.q.drop_leases_of, {"digest": digest})
        return bool(forgotten)

    @map_errors
    def adopt_blob(self, digest: str, size: int) -> bool:
        """Indexes bytes linksvc did not know, as marked; False when recorded already."""
        now = utcnow()
        values = {
            "digest": digest,
            "size": size,
            "state": BlobState.MARKED.value,
            "created_at": now,
            "updated_at": now,
        }
        with self.db.connect() as conn:
            if conn.execute(self.q.record_blob, values).rowcount:
                return True
            recorded = conn.execute(self.q.blob, {"digest": digest}).first()
        if recorded is not None and recorded.size != size:
            raise failed_precondition(
                Reason.SIZE_INVALID,
                f"blob {digest} is recorded with size {recorded.size}, not {size}",
                size=recorded.size,
            )
        return False

    @map_errors
    def list_blobs(self, after: str, limit: int) -> tuple[list[IndexedBlob], str | None]:
        with self.db.connect() as conn:
            rows = conn.execute(self.q.list_blobs, {"after": after, "limit": limit + 1}).all()
        page = [_indexed(r) for r in rows[:limit]]
        return page, (page[-1].digest if len(rows) > limit else None)

    # --- the runner lock ------------------------------------------------------------------

    @map_errors
    def acquire_runner_lock(self, name: str, holder: str, ttl: timedelta) -> RunnerLock:
        now = utcnow()
        values = {"name": name, "holder": holder, "expires_at": now + ttl, "now": now}
        with self.db.connect() as conn:
            taken = conn.execute(self.q.acquire_runner_lock, values).first()
            if taken is not None:
                return RunnerLock(True, taken.holder, taken.expires_at)
            current = conn.execute(self.q.runner_lock, {"name": name}).first()
        if current is None:  # released meanwhile
            return RunnerLock(False, "", None)
        return RunnerLock(False, current.holder, current.expires_at)

    @map_errors
    def release_runner_lock(self, name: str, holder: str) -> None:
        with self.db.connect() as conn:
            conn.execute(self.q.release_runner_lock, {"name": name, "holder": holder})
