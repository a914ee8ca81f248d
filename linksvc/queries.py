"""The SQL of linksvc: every statement the store runs, built once per dialect.

Built at start-up and reused, so a call only binds parameters to an already compiled statement
(SQLAlchemy's compiled cache; psycopg then prepares it on the server). Every lookup is served by
a primary key or an index (a test runs EXPLAIN on each one, on both databases).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler

from linksvc.models import BlobState, SessionState, UtcDateTime, blobs, links, repositories
from linksvc.models import upload_sessions as sessions


@dataclass(frozen=True)
class DriverQuery:
    """A statement compiled once to the driver's own SQL, run on the driver's cursor
    (``Database.execute``, ``Database.fetch_one``).

    The hot calls (Resolve behind every stat, Link and Mount behind every push and mount) skip
    SQLAlchemy's per-execution machinery this way: measured inside the server, it cost several
    times the statement itself (bench/README.md, "linksvc: driver queries").
    Parameters go through their types' bind processors (UTC datetimes become SQLite text);
    result columns are returned as the driver gives them, so select only plain numbers and
    strings.
    """

    sql: str
    positions: tuple[str, ...] | None  # parameter order for positional (qmark) drivers
    processors: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    constants: Mapping[str, Any] = field(default_factory=dict)  # e.g. LIMIT 1's parameter

    @classmethod
    def compile(cls, statement: sa.ClauseElement, dialect: Dialect) -> DriverQuery:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        positions = tuple(compiled.positiontup or ()) if compiled.positional else None
        processors = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.bind_processor(dialect)
            if processor is not None:
                processors[name] = processor
        constants = {name: bind.value for name, bind in compiled.binds.items() if not bind.required}
        return cls(str(compiled), positions, processors, constants)

    def parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | Mapping[str, Any]:
        if self.constants:
            values = {**self.constants, **values}
        if self.processors:
            values = {
                name: (self.processors[name](v) if name in self.processors else v)
                for name, v in values.items()
            }
        if self.positions is None:
            return values
        return tuple(values[name] for name in self.positions)


@dataclass(frozen=True, slots=True)
class DriverResult:
    rows: list[tuple[Any, ...]]
    rowcount: int  # rows an INSERT, UPDATE or DELETE changed


def _dialect_insert(dialect: Dialect) -> Any:
    """The dialect's INSERT (with ON CONFLICT), importing only the dialect in use."""
    if dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    from sqlalchemy.dialects.postgresql import insert as postgresql_insert

    return postgresql_insert


def _text(sql: str) -> sa.TextClause:
    """A hand-written statement whose ``:now`` parameter is a UTC datetime."""
    return sa.text(sql).bindparams(sa.bindparam("now", type_=UtcDateTime()))


# PostgreSQL only: a push's record-and-link as one statement, so one round trip and one commit
# in autocommit mode. It links only when the blob is new or recorded with the same size, and
# creates the repository only then. Returns whether it linked, and the link as it stood before
# (size, media type; NULL when there was none) so that a repeated push needs nothing more. A
# size that differs or a concurrent writer of the same blob make it change nothing, and the
# caller takes the general path. (Every part of one statement sees the snapshot taken before
# it; the foreign keys are checked at its end, when the blob and repository rows are there.)
_LINK_NEW_PG = """
WITH new_blob AS (
    INSERT INTO blobs (digest, size, state, created_at, updated_at)
    VALUES (:digest, :size, :state, :now, :now)
    ON CONFLICT (digest) DO NOTHING
    RETURNING digest
), usable AS (
    SELECT 1 FROM new_blob
    UNION ALL
    SELECT 1 FROM blobs WHERE digest = :digest AND size = :size
), new_repository AS (
    INSERT INTO repositories (name, created_at)
    SELECT :repository, :now WHERE EXISTS (SELECT FROM usable)
    ON CONFLICT (name) DO NOTHING
), new_link AS (
    INSERT INTO links (repository, digest, media_type, created_at)
    SELECT :repository, :digest, :media_type, :now WHERE EXISTS (SELECT FROM usable)
    ON CONFLICT (repository, digest) DO NOTHING
    RETURNING 1
)
SELECT EXISTS (SELECT FROM new_link), linked.size, linked.media_type
FROM (SELECT 1) AS one
LEFT JOIN (
    SELECT blobs.size, links.media_type
    FROM links JOIN blobs ON blobs.digest = links.digest
    WHERE links.repository = :repository AND links.digest = :digest
) AS linked ON true
"""

# PostgreSQL only: a mount as one statement. Returns no row when the source does not link the
# blob (and then changes nothing); else the size, the new link's media type (NULL when the
# link existed already) and the existing link's media type (NULL when there was none before
# this statement). No FOR SHARE on the source: the new link's foreign key locks the blob row
# (a blob that is linked cannot be deleted), and an unlink of the source that commits meanwhile
# simply comes after this mount.
_MOUNT_PG = """
WITH source AS (
    SELECT blobs.size, links.media_type
    FROM links JOIN blobs ON blobs.digest = links.digest
    WHERE links.digest = :digest {source_filter}
    LIMIT 1
), new_repository AS (
    INSERT INTO repositories (name, created_at)
    SELECT :repository, :now FROM source
    ON CONFLICT (name) DO NOTHING
), new_link AS (
    INSERT INTO links (repository, digest, media_type, created_at)
    SELECT :repository, :digest, COALESCE(NULLIF(:media_type, ''), source.media_type), :now
    FROM source
    ON CONFLICT (repository, digest) DO NOTHING
    RETURNING media_type
)
SELECT source.size, new_link.media_type, existing.media_type
FROM source
LEFT JOIN new_link ON true
LEFT JOIN links AS existing ON existing.repository = :repository AND existing.digest = :digest
"""


class Queries:
    def __init__(self, dialect: Dialect) -> None:
        insert = _dialect_insert(dialect)
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

        # --- the hot paths on the driver's cursor (see DriverQuery) --------------------------
        driver = DriverQueries(self, dialect)
        self.driver = driver


class DriverQueries:
    """The statements of the hot calls (resolve, link, mount), compiled for the driver."""

    def __init__(self, q: Queries, dialect: Dialect) -> None:
        def compiled(statement: sa.ClauseElement) -> DriverQuery:
            return DriverQuery.compile(statement, dialect)

        self.resolve = compiled(q.resolve)
        self.record_blob = compiled(q.record_blob)
        self.blob_size = compiled(
            sa.select(blobs.c.size).where(blobs.c.digest == sa.bindparam("digest"))
        )
        self.add_repository = compiled(q.add_repository)
        self.link_recorded = compiled(q.link_recorded)
        self.add_link = compiled(q.add_link)
        self.set_media_type = compiled(q.set_media_type)
        self.mount_from = compiled(q.mount_from)
        self.mount_from_any = compiled(q.mount_from_any)
        # One-statement versions, where the database can modify several tables in one.
        self.link_new: DriverQuery | None = None
        self.mount_one_from: DriverQuery | None = None
        self.mount_one_from_any: DriverQuery | None = None
        if dialect.name == "postgresql":
            self.link_new = compiled(_text(_LINK_NEW_PG))
            self.mount_one_from = compiled(
                _text(_MOUNT_PG.format(source_filter="AND links.repository = :from_repository"))
            )
            self.mount_one_from_any = compiled(_text(_MOUNT_PG.format(source_filter="")))
