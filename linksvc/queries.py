"""The SQL of linksvc: every statement the store runs, built once per dialect.

Built at start-up and reused, so a call only binds parameters to an already compiled statement
(SQLAlchemy's compiled cache; psycopg then prepares it on the server). Every lookup is served by
a primary key or an index (a test runs EXPLAIN on each one, on both databases).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

from linksvc.models import BlobState, SessionState, UtcDateTime, blobs, links, repositories
from linksvc.models import upload_sessions as sessions


@dataclass(frozen=True)
class DriverQuery:
    """A statement compiled once to the driver's own SQL, for ``Database.fetch_one``.

    The hottest read (Resolve, behind every stat) skips SQLAlchemy's per-execution machinery
    this way: measured inside the server, that machinery cost several times the query itself.
    Only for statements whose parameters and columns need no type conversion.
    """

    sql: str
    positions: tuple[str, ...] | None  # parameter order for positional (qmark) drivers

    @classmethod
    def compile(cls, statement: sa.Select[Any], dialect: Dialect) -> DriverQuery:
        compiled = statement.compile(dialect=dialect)
        positions = tuple(compiled.positiontup or ()) if compiled.positional else None
        return cls(str(compiled), positions)

    def parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | Mapping[str, Any]:
        if self.positions is None:
            return values
        return tuple(values[name] for name in self.positions)


class Queries:
    def __init__(self, dialect: Dialect) -> None:
        insert = sqlite.insert if dialect.name == "sqlite" else postgresql.insert
        b = sa.bindparam

        # --- blobs -----------------------------------------------------------------------
        # An INSERT's rowcount (did it insert?) survives the cursor only when asked to.
        counted = {"preserve_rowcount": True}
        self.record_blob = (
            insert(blobs)
            .on_conflict_do_nothing(index_elements=[blobs.c.digest])
            .execution_options(**counted)
        )
        self.blob = sa.select(blobs.c.size, blobs.c.created_at).where(blobs.c.digest == b("digest"))

        # --- links -----------------------------------------------------------------------
        self.add_repository = insert(repositories).on_conflict_do_nothing(
            index_elements=[repositories.c.name]
        )
        # Links only a recorded blob: no row in blobs, nothing inserted (and no FK error).
        self.link_recorded = (
            insert(links)
            .from_select(
                ["repository", "digest", "media_type", "created_at"],
                sa.select(
                    b("repository", type_=links.c.repository.type),
                    blobs.c.digest,
                    b("media_type", type_=links.c.media_type.type),
                    b("created_at", type_=UtcDateTime()),
                ).where(blobs.c.digest == b("digest")),
            )
            .on_conflict_do_nothing(index_elements=[links.c.repository, links.c.digest])
            .execution_options(**counted)
        )
        self.add_link = (
            insert(links)
            .on_conflict_do_nothing(index_elements=[links.c.repository, links.c.digest])
            .execution_options(**counted)
        )
        self.set_media_type = (
            sa.update(links)
            .where(links.c.repository == b("p_repository"), links.c.digest == b("p_digest"))
            .values(media_type=b("p_media_type"))
        )
        joined = links.join(blobs, blobs.c.digest == links.c.digest)
        self.resolve = (
            sa.select(blobs.c.size, links.c.media_type)
            .select_from(joined)
            .where(links.c.repository == b("repository"), links.c.digest == b("digest"))
        )
        self.resolve_row = DriverQuery.compile(self.resolve, dialect)
        # The source of a mount; FOR SHARE keeps it from being unlinked until the mount commits
        # (PostgreSQL; SQLite's BEGIN IMMEDIATE already serializes writers).
        mount_source = (
            sa.select(blobs.c.size, links.c.media_type)
            .select_from(joined)
            .where(links.c.digest == b("digest"))
            .limit(1)
            .with_for_update(read=True, of=links)
        )
        self.mount_from = mount_source.where(links.c.repository == b("from_repository"))
        self.mount_from_any = mount_source
        self.unlink = sa.delete(links).where(
            links.c.repository == b("repository"), links.c.digest == b("digest")
        )
        self.list_links = (
            sa.select(links.c.digest, blobs.c.size, links.c.media_type)
            .select_from(joined)
            .where(links.c.repository == b("repository"), links.c.digest > b("after"))
            .order_by(links.c.digest)
            .limit(b("limit"))
        )
        self.list_repositories = (
            sa.select(repositories.c.name)
            .where(repositories.c.name > b("after"))
            .order_by(repositories.c.name)
            .limit(b("limit"))
        )

        # --- upload sessions -----------------------------------------------------------------
        # (UPDATE parameters are named p_*: SQLAlchemy reserves column names for SET values.)
        self.create_session = sa.insert(sessions)
        self.get_session = sa.select(sessions).where(sessions.c.id == b("id"))
        # The compare-and-set: one statement, so of two advances from one size exactly one wins.
        self.advance_session = (
            sa.update(sessions)
            .where(
                sessions.c.id == b("p_id"),
                sessions.c.size == b("from_size"),
                sessions.c.state == SessionState.ACTIVE.value,
            )
            .values(size=b("to_size"), updated_at=b("now"))
            .returning(*sessions.c)
        )
        self.finish_session = (
            sa.update(sessions)
            .where(sessions.c.id == b("p_id"), sessions.c.state == SessionState.ACTIVE.value)
            .values(state=b("p_state"), updated_at=b("now"))
            .returning(*sessions.c)
        )
        self.finish_session_of = self.finish_session.where(
            sessions.c.repository == b("p_repository")
        )
        self.stale_sessions = (
            sa.select(sessions)
            .where(sessions.c.updated_at <= b("cutoff"))
            .order_by(sessions.c.updated_at)
            .limit(b("limit"))
        )
        self.purge_session = sa.delete(sessions).where(sessions.c.id == b("id"))

        # --- garbage collection (its calls come with the GC issue; the index is here now) -----
        # Blobs no repository links, recorded before a cutoff, oldest first.
        self.unreferenced_blobs = (
            sa.select(blobs.c.digest, blobs.c.size)
            .where(
                blobs.c.state == BlobState.COMMITTED.value,
                blobs.c.updated_at <= b("cutoff"),
                ~sa.exists().where(links.c.digest == blobs.c.digest),
            )
            .order_by(blobs.c.updated_at)
            .limit(b("limit"))
        )
