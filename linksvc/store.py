"""The domain logic of linksvc: links, the blob index and upload sessions, as SQL.

Plain Python, no gRPC: every method takes values the servicer has already validated (parsed
digests, valid names, sizes >= 0), runs one short transaction (most of them a single statement)
and returns plain records or raises :class:`linkedblob.errors.LinkedBlobError`. The methods
block; the servicer runs them through the database (``Database.run_hot`` / ``Database.run``:
on the event loop or in the SQL threads). The SQL itself is in :mod:`linksvc.queries`; the hot
calls run it on the driver's cursor, and on PostgreSQL a push's link and a mount are one
statement each (one round trip) in the common case, with the general transaction behind them.

Link, Mount and RecordBlob lock the blob's row before they decide anything (``lock_live``), as
garbage collection's fence does (linksvc.lifecycle): a blob being deleted is refused
(BLOB_DELETING), a marked one revived, and a new one recorded only with a live lease.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from linkedblob.errors import Reason, aborted, failed_precondition, not_found
from linksvc.database import Database, map_errors
from linksvc.models import BlobState, SessionState
from linksvc.queries import Queries
from linksvc.sessions import SessionStore, finished_session, utcnow


@dataclass(frozen=True, slots=True)
class LinkedBlob:
    """A blob as a repository sees it through its link."""

    digest: str
    size: int
    media_type: str


@dataclass(frozen=True, slots=True)
class BlobRecord:
    digest: str
    size: int
    created_at: datetime


class LinkStore(SessionStore):
    """Links and the blob index; upload sessions come from :class:`SessionStore`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.q = Queries(db.engine.dialect)

    # --- blobs ---------------------------------------------------------------------------

    @map_errors
    def record_blob(self, digest: str, size: int, lease_id: str = "") -> bool:
        """Records a committed blob; True when new, which needs the live lease ``lease_id`` of
        the digest (consumed), as Link does. A different size than recorded is refused, a blob
        being deleted too (BLOB_DELETING); a marked one is revived."""
        now = utcnow()
        db = self.db
        with db.transaction() as conn:
            recorded = self.lock_live(conn, digest, now)
            if recorded is None:
                lease = {"lease_id": lease_id, "digest": digest, "now": now}
                if not (lease_id and db.execute(conn, self.q.driver.consume_lease, lease).rowcount):
                    raise _lease_expired(digest)
                if self._insert_blob(conn, digest, size, now):
                    return True
                recorded = self.lock_live(conn, digest, now)  # recorded meanwhile
                assert recorded is not None  # a blob is forgotten only when deleting
            _check_size(digest, recorded, size)
        return False

    def lock_live(self, conn: sa.Connection, digest: str, now: datetime) -> int | None:
        """Locks the blob's row (see Queries.lock_blob) and returns its size, or None when it is
        not recorded. A blob being deleted is ABORTED / BLOB_DELETING; a marked one is revived."""
        d = self.q.driver
        rows = self.db.execute(conn, d.lock_blob, {"digest": digest}).rows
        if not rows:
            return None
        size, state = rows[0][0], rows[0][1]
        if state == BlobState.DELETING:
            raise aborted(
                Reason.BLOB_DELETING, f"blob {digest} is being deleted; retry (upload again)"
            )
        if state == BlobState.MARKED:
            self.db.execute(conn, d.revive, {"p_digest": digest, "now": now})
        return int(size)

    def _insert_blob(self, conn: sa.Connection, digest: str, size: int, now: datetime) -> bool:
        values = {
            "digest": digest,
            "size": size,
            "state": BlobState.ACTIVE.value,
            "version": 0,
            "created_at": now,
            "updated_at": now,
        }
        return bool(self.db.execute(conn, self.q.driver.record_blob, values).rowcount)

    @map_errors
    def stat_blob(self, digest: str) -> BlobRecord:
        with self.db.connect() as conn:
            row = conn.execute(self.q.blob, {"digest": digest}).first()
        if row is None:
            raise not_found(Reason.BLOB_UNKNOWN, f"blob {digest} is not recorded")
        return BlobRecord(digest, row.size, row.created_at)

    # --- links ---------------------------------------------------------------------------

    @map_errors
    def link(
        self,
        repository: str,
        digest: str,
        media_type: str = "",
        size: int | None = None,
        finish_session_id: str = "",
        lease_id: str = "",
    ) -> tuple[LinkedBlob, bool]:
        """Links a blob into a repository; with ``size``, records the blob first if it is not
        recorded, which needs the live lease ``lease_id`` of the digest (consumed). All in one
        transaction, together with finishing ``finish_session_id`` as committed. A marked blob
        is revived, a blob being deleted refused (BLOB_DELETING)."""
        d = self.q.driver
        values = {"repository": repository, "digest": digest}
        if not finish_session_id:
            if d.link_one is not None:
                # One statement (see queries._LINK_PG), which also reads the link as it stood.
                row = self.db.fetch_one(
                    d.link_one,
                    {**values, "size": size, "media_type": media_type, "lease_id": lease_id,
                     "now": utcnow()},
                )  # fmt: skip
                assert row is not None  # the statement always answers one row
                created, linked_size, linked_media_type, state, blob_size, _leased = row
                if created:
                    linked_now = blob_size if state is not None else size
                    assert linked_now is not None
                    return LinkedBlob(digest, linked_now, media_type), True
                if state is None and size is None:
                    raise _unknown_blob(digest)
                if state != BlobState.ACTIVE:
                    linked_size = None  # the general path decides
            elif not lease_id:
                linked = self.db.fetch_one(d.resolve, values)
                linked_size, linked_media_type = linked if linked is not None else (None, None)
            else:
                linked_size = linked_media_type = None
            # Linked already, just as asked (a blob pushed again): nothing to write.
            if (
                linked_size is not None
                and size in (None, linked_size)
                and media_type in ("", linked_media_type)
            ):
                return LinkedBlob(digest, linked_size, linked_media_type), False
        now = utcnow()
        db = self.db
        with db.transaction() as conn:
            recorded = self.lock_live(conn, digest, now)
            if recorded is None:
                if size is None:
                    raise _unknown_blob(digest)
                lease = {"lease_id": lease_id, "digest": digest, "now": now}
                if not (lease_id and db.execute(conn, d.consume_lease, lease).rowcount):
                    raise _lease_expired(digest)
                if not self._insert_blob(conn, digest, size, now):
                    recorded = self.lock_live(conn, digest, now)  # recorded meanwhile
            elif lease_id:
                db.execute(conn, d.drop_lease, {"lease_id": lease_id})
            if recorded is not None and size is not None:
                _check_size(digest, recorded, size)
            blob_size = recorded if recorded is not None else size
            assert blob_size is not None
            descriptor, created = self.link_locked(conn, repository, digest, media_type, blob_size)
            if finish_session_id:
                finished_session(
                    self.q, conn, finish_session_id, SessionState.COMMITTED, now, repository
                )
        return descriptor, created

    def link_locked(
        self, conn: sa.Connection, repository: str, digest: str, media_type: str, size: int
    ) -> tuple[LinkedBlob, bool]:
        """Links a live blob whose row this transaction has locked (lock_live)."""
        d = self.q.driver
        now = utcnow()
        self.db.execute(conn, d.add_repository, {"name": repository, "created_at": now})
        created = bool(
            self.db.execute(
                conn,
                d.link_recorded,
                {"repository": repository, "digest": digest, "media_type": media_type,
                 "created_at": now},
            ).rowcount
        )  # fmt: skip
        if created:
            return LinkedBlob(digest, size, media_type), True
        return self._existing_link(conn, repository, digest, media_type), False

    def _existing_link(
        self, conn: sa.Connection, repository: str, digest: str, media_type: str
    ) -> LinkedBlob:
        """The link as it stands, with its media type replaced when a new one is given."""
        d = self.q.driver
        rows = self.db.execute(conn, d.resolve, {"repository": repository, "digest": digest}).rows
        if not rows:
            raise not_found(Reason.BLOB_UNKNOWN, f"blob {digest} is not recorded")
        size, linked_media_type = rows[0]
        if media_type and media_type != linked_media_type:
            self.db.execute(
                conn,
                d.set_media_type,
                {"p_repository": repository, "p_digest": digest, "p_media_type": media_type},
            )
            return LinkedBlob(digest, size, media_type)
        return LinkedBlob(digest, size, linked_media_type)

    @map_errors
    def resolve(self, repository: str, digest: str) -> LinkedBlob:
        # The hottest call (every stat): the lean path, see DriverQuery.
        row = self.db.fetch_one(self.q.driver.resolve, {"repository": repository, "digest": digest})
        if row is None:
            raise not_found(Reason.BLOB_UNKNOWN, f"blob {digest} is not linked in {repository}")
        size, media_type = row
        return LinkedBlob(digest, size, media_type)

    @map_errors
    def unlink(self, repository: str, digest: str) -> None:
        # The blob stays active: the next MarkUnreferenced marks it if nothing links it.
        with self.db.connect() as conn:
            deleted = conn.execute(
                self.q.unlink, {"repository": repository, "digest": digest}
            ).rowcount
        if not deleted:
            raise not_found(Reason.BLOB_UNKNOWN, f"blob {digest} is not linked in {repository}")

    @map_errors
    def mount(
        self, repository: str, from_repository: str, digest: str, media_type: str = ""
    ) -> tuple[LinkedBlob, bool]:
        """Links into ``repository`` a blob that ``from_repository`` (empty: any) links. A
        marked blob is revived, a blob being deleted refused (BLOB_DELETING)."""
        d = self.q.driver
        now = utcnow()
        values = {"repository": repository, "digest": digest, "media_type": media_type}
        if from_repository:
            values["from_repository"] = from_repository
        one_statement = d.mount_one_from if from_repository else d.mount_one_from_any
        if one_statement is not None:
            row = self.db.fetch_one(one_statement, {**values, "now": now})
            assert row is not None  # the statement always answers one row
            state, size, new_media_type, existing_media_type = row
            if state is None or (state == BlobState.ACTIVE and size is None):
                raise _not_mountable(digest, from_repository)
            if new_media_type is not None:
                return LinkedBlob(digest, size, new_media_type), True
            if (
                size is not None
                and existing_media_type is not None
                and media_type in ("", existing_media_type)
            ):
                return LinkedBlob(digest, size, existing_media_type), False
            # Not active, linked meanwhile, or the link's media type changes: the general path.
        db = self.db
        with db.transaction() as conn:
            if self.lock_live(conn, digest, now) is None:
                raise _not_mountable(digest, from_repository)
            source = d.mount_from if from_repository else d.mount_from_any
            rows = db.execute(conn, source, values).rows
            if not rows:
                raise _not_mountable(digest, from_repository)
            size, source_media_type = rows[0]
            db.execute(conn, d.add_repository, {"name": repository, "created_at": now})
            new_media_type = media_type or source_media_type
            created = bool(
                db.execute(
                    conn,
                    d.add_link,
                    {
                        "repository": repository,
                        "digest": digest,
                        "media_type": new_media_type,
                        "created_at": now,
                    },
                ).rowcount
            )
            if created:
                return LinkedBlob(digest, size, new_media_type), True
            # Already linked: the link keeps its media type unless the caller gave one.
            return self._existing_link(conn, repository, digest, media_type), False

    @map_errors
    def list_links(
        self, repository: str, after: str, limit: int
    ) -> tuple[list[LinkedBlob], str | None]:
        """Up to ``limit`` links after the digest ``after``; and the last digest when more
        follow."""
        with self.db.connect() as conn:
            rows = conn.execute(
                self.q.list_links, {"repository": repository, "after": after, "limit": limit + 1}
            ).all()
        page = [LinkedBlob(r.digest, r.size, r.media_type) for r in rows[:limit]]
        return page, (page[-1].digest if len(rows) > limit else None)

    @map_errors
    def linking_repositories(
        self, digest: str, after: str, limit: int
    ) -> tuple[list[str], str | None]:
        """Up to ``limit`` repositories that link ``digest``, after the name ``after``; and the
        last name when more follow."""
        with self.db.connect() as conn:
            rows = conn.execute(
                self.q.linking_repositories, {"digest": digest, "after": after, "limit": limit + 1}
            ).all()
        page = [r.repository for r in rows[:limit]]
        return page, (page[-1] if len(rows) > limit else None)

    @map_errors
    def list_repositories(self, after: str, limit: int) -> tuple[list[str], str | None]:
        with self.db.connect() as conn:
            rows = conn.execute(
                self.q.list_repositories, {"after": after, "limit": limit + 1}
            ).all()
        page = [r.name for r in rows[:limit]]
        return page, (page[-1] if len(rows) > limit else None)

    # --- upload sessions -------------------------------------------------------------------


def _check_size(digest: str, recorded: int, given: int) -> None:
    if recorded != given:
        raise failed_precondition(
            Reason.SIZE_INVALID,
            f"blob {digest} is recorded with size {recorded}, not {given}",
            size=recorded,
        )


def _unknown_blob(digest: str) -> Exception:
    return not_found(Reason.BLOB_UNKNOWN, f"blob {digest} is not recorded")


def _lease_expired(digest: str) -> Exception:
    return aborted(
        Reason.BLOB_UPLOAD_INVALID,
        f"no live lease of {digest}: the lease expired; upload again",
    )


def _not_mountable(digest: str, from_repository: str) -> Exception:
    where = from_repository or "any repository"
    return not_found(Reason.BLOB_UNKNOWN, f"blob {digest} is not linked in {where}")
