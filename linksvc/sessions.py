"""Upload sessions in linksvc's database: create (with the per-repository limit), read, list,
advance, finish, and the collector's purge. A part of :class:`linksvc.store.LinkStore`, which
links a pushed blob and finishes its session in one transaction (``finished_session``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from linkedblob.errors import Reason, aborted, failed_precondition, not_found, resource_exhausted
from linksvc.database import Database, map_errors
from linksvc.models import SessionState
from linksvc.queries import Queries

# PostgreSQL: a transaction-scoped lock on a repository's session count (see create_session).
_LOCK_REPOSITORY_SESSIONS = sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))")


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    repository: str
    size: int
    state: SessionState
    started_at: datetime
    updated_at: datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_session_id() -> str:
    """192 random bits, URL-safe ([A-Za-z0-9_-]{32}): blobsvc names its staging area after it."""
    return secrets.token_urlsafe(24)


def _session(row: Any) -> SessionRecord:
    return SessionRecord(
        row.id, row.repository, row.size, SessionState(row.state), row.started_at, row.updated_at
    )


class SessionStore:
    db: Database
    q: Queries

    @map_errors
    def create_session(self, repository: str, max_active: int = 0) -> SessionRecord:
        """A new active session of ``repository``; with ``max_active``, refused
        (RESOURCE_EXHAUSTED / TOO_MANY_REQUESTS, limit max-sessions-per-repository) when the
        repository has that many active sessions already, counted in the same transaction."""
        now = utcnow()
        record = SessionRecord(new_session_id(), repository, 0, SessionState.ACTIVE, now, now)
        if not max_active:
            with self.db.connect() as conn:
                self._insert_session(conn, record)
            return record
        with self.db.transaction() as conn:
            if self.db.dialect == "postgresql":
                # Two creations in one repository take turns (READ COMMITTED would let both
                # count the same sessions); SQLite's transactions take turns anyway.
                conn.execute(_LOCK_REPOSITORY_SESSIONS, {"key": f"sessions:{repository}"})
            active = conn.execute(
                self.q.count_active_sessions, {"repository": repository}
            ).scalar_one()
            if active >= max_active:
                raise resource_exhausted(
                    Reason.TOO_MANY_REQUESTS,
                    f"{active} uploads are open in this repository, the most allowed; finish "
                    "or cancel one, or retry later",
                    limit="max-sessions-per-repository",
                )
            self._insert_session(conn, record)
        return record

    def _insert_session(self, conn: sa.Connection, record: SessionRecord) -> None:
        now = record.started_at
        conn.execute(
            self.q.create_session,
            {
                "id": record.id,
                "repository": record.repository,
                "size": 0,
                "state": record.state.value,
                "started_at": now,
                "updated_at": now,
            },
        )

    @map_errors
    def get_session(self, session_id: str) -> SessionRecord:
        with self.db.connect() as conn:
            row = conn.execute(self.q.get_session, {"id": session_id}).first()
        if row is None:
            raise _unknown_session(session_id)
        return _session(row)

    @map_errors
    def list_sessions(
        self, repository: str, after: str, limit: int
    ) -> tuple[list[SessionRecord], str | None]:
        """Up to ``limit`` active sessions of ``repository`` after the id ``after``; and the
        last id when more follow."""
        params = {"repository": repository, "after": after, "limit": limit + 1}
        with self.db.connect() as conn:
            rows = conn.execute(self.q.list_sessions, params).all()
        page = [_session(r) for r in rows[:limit]]
        return page, (page[-1].id if len(rows) > limit else None)

    @map_errors
    def advance_session(self, session_id: str, from_size: int, to_size: int) -> SessionRecord:
        """Sets the size to ``to_size`` if it still is ``from_size`` (and the session active)."""
        with self.db.connect() as conn:
            row = conn.execute(
                self.q.advance_session,
                {"p_id": session_id, "from_size": from_size, "to_size": to_size, "now": utcnow()},
            ).first()
            if row is not None:
                return _session(row)
            current = conn.execute(self.q.get_session, {"id": session_id}).first()
        if current is None or current.state != SessionState.ACTIVE.value:
            raise _unknown_session(session_id, current.state if current else None)
        raise aborted(
            Reason.BLOB_UPLOAD_INVALID,
            f"upload session {session_id} is at size {current.size}, not {from_size}",
            size=current.size,
        )

    @map_errors
    def finish_session(self, session_id: str, state: SessionState) -> SessionRecord:
        with self.db.connect() as conn:
            return finished_session(self.q, conn, session_id, state, utcnow())

    @map_errors
    def list_stale_sessions(self, older_than: timedelta, limit: int) -> list[SessionRecord]:
        cutoff = utcnow() - older_than
        with self.db.connect() as conn:
            rows = conn.execute(self.q.stale_sessions, {"cutoff": cutoff, "limit": limit}).all()
        return [_session(r) for r in rows]

    @map_errors
    def purge_session(self, session_id: str) -> None:
        with self.db.connect() as conn:
            conn.execute(self.q.purge_session, {"id": session_id})


def finished_session(
    q: Queries,
    conn: sa.Connection,
    session_id: str,
    state: SessionState,
    now: datetime,
    repository: str = "",
) -> SessionRecord:
    """Finishes ``session_id`` (of ``repository``, when given) as ``state`` in ``conn``'s
    transaction; finishing twice the same way is a no-op."""
    params = {"p_id": session_id, "p_state": state.value, "now": now}
    if repository:
        row = conn.execute(q.finish_session_of, {**params, "p_repository": repository})
    else:
        row = conn.execute(q.finish_session, params)
    finished = row.first()
    if finished is not None:
        return _session(finished)
    current = conn.execute(q.get_session, {"id": session_id}).first()
    if current is None or (repository and current.repository != repository):
        raise _unknown_session(session_id)
    if current.state == state.value:  # finishing twice the same way is a no-op
        return _session(current)
    raise failed_precondition(
        Reason.BLOB_UPLOAD_INVALID,
        f"upload session {session_id} is already {current.state}",
        state=current.state,
    )


def _unknown_session(session_id: str, state: str | None = None) -> Exception:
    what = f"is {state}" if state else "is unknown"
    return not_found(Reason.BLOB_UPLOAD_UNKNOWN, f"upload session {session_id} {what}")
