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

from linksvc.models import (
    BlobState,
    SessionState,
    UtcDateTime,
    blobs,
    links,
    repositories,
    runner_locks,
)
from linksvc.models import blob_leases as leases
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
# in autocommit mode. It first locks the blob's row (FOR NO KEY UPDATE: the fence's FOR UPDATE
# waits for this statement, and this statement for a fence, then reads the row as the fence
# left it). It links only an active blob of the same size, or a new blob with a live lease of
# the digest (recorded active), and creates the repository only then; the lease is consumed
# unless the row is marked or deleting (the general path decides those). Returns whether it
# linked, the link as it stood before (size, media type; NULL when there was none), the locked
# row's state and size (NULL: no row) and whether a live lease was consumed. Anything
# else changes nothing but the lease, and the caller takes the general path. (Every part of one
# statement sees the snapshot taken before it, except the locked row, which is the newest; the
# foreign keys are checked at its end, when the blob and repository rows are there.)
_LINK_PG = """
WITH locked AS (
    SELECT size, state FROM blobs WHERE digest = :digest FOR NO KEY UPDATE
), lease AS (
    DELETE FROM blob_leases
    WHERE id = :lease_id AND digest = :digest
        AND NOT EXISTS (SELECT FROM locked WHERE state <> 'active')
        AND (CAST(:size AS BIGINT) IS NOT NULL OR EXISTS (SELECT FROM locked))
    RETURNING expires_at > :now AS live
), new_blob AS (
    INSERT INTO blobs (digest, size, state, version, created_at, updated_at)
    SELECT :digest, :size, 'active', 0, :now, :now
    WHERE CAST(:size AS BIGINT) IS NOT NULL
        AND NOT EXISTS (SELECT FROM locked)
        AND EXISTS (SELECT FROM lease WHERE live)
    ON CONFLICT (digest) DO NOTHING
    RETURNING digest
), usable AS (
    SELECT 1 FROM locked
    WHERE state = 'active' AND size = COALESCE(CAST(:size AS BIGINT), size)
    UNION ALL
    SELECT 1 FROM new_blob
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
SELECT EXISTS (SELECT FROM new_link), linked.size, linked.media_type,
    (SELECT state FROM locked), (SELECT size FROM locked), EXISTS (SELECT FROM lease WHERE live)
FROM (SELECT 1) AS one
LEFT JOIN (
    SELECT blobs.size, links.media_type
    FROM links JOIN blobs ON blobs.digest = links.digest
    WHERE links.repository = :repository AND links.digest = :digest
) AS linked ON true
"""

# PostgreSQL only: a mount as one statement. It locks the blob's row first (as _LINK_PG) and
# mounts only an active blob. Returns one row: the row's state (NULL: not recorded), the size
# (NULL when the source does not link the blob or the blob is not active: nothing changed), the
# new link's media type (NULL when the link existed already) and the existing link's media type
# (NULL when there was none before this statement). No FOR SHARE on the source: an unlink of the
# source that commits meanwhile simply comes after this mount.
_MOUNT_PG = """
WITH locked AS (
    SELECT size, state FROM blobs WHERE digest = :digest FOR NO KEY UPDATE
), source AS (
    SELECT locked.size, links.media_type
    FROM locked JOIN links ON links.digest = :digest {source_filter}
    WHERE locked.state = 'active'
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
SELECT (SELECT state FROM locked), source.size, new_link.media_type, existing.media_type
FROM (SELECT 1) AS one
LEFT JOIN source ON true
LEFT JOIN new_link ON true
LEFT JOIN links AS existing ON existing.repository = :repository AND existing.digest = :digest
"""


# PostgreSQL only: a Lease as one statement in the common cases: no row (a lease), an active
# blob without link_repository (a lease) or with it (a link, created or as it was). It locks the
# blob's row first, as _LINK_PG. Returns the locked row's state and size (NULL: no row), whether
# it took the lease, whether it created the link, and the existing link's media type (NULL when
# there was none). A marked or deleting blob changes nothing, and the caller takes the general
# path (which revives or refuses).
_LEASE_PG = """
WITH locked AS (
    SELECT size, state FROM blobs WHERE digest = :digest FOR NO KEY UPDATE
), usable AS (
    SELECT size FROM locked
    WHERE state = 'active' AND CAST(:repository AS TEXT) <> ''
        AND size = COALESCE(CAST(:size AS BIGINT), size)
), new_lease AS (
    INSERT INTO blob_leases (id, digest, created_at, expires_at)
    SELECT :lease_id, :digest, :now, :expires_at
    WHERE NOT EXISTS (SELECT FROM locked WHERE state <> 'active')
        AND NOT (CAST(:repository AS TEXT) <> '' AND EXISTS (SELECT FROM locked))
    RETURNING 1
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
SELECT (SELECT state FROM locked), (SELECT size FROM locked), EXISTS (SELECT FROM new_lease),
    EXISTS (SELECT FROM new_link), existing.media_type
FROM (SELECT 1) AS one
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
        # Every transaction that decides a blob's fate locks its row first (PostgreSQL; SQLite's
        # BEGIN IMMEDIATE serializes writers already), then reads links and leases in later
        # statements, which see what committed meanwhile. FOR NO KEY UPDATE: links, mounts and
        # leases of one blob wait for each other and for a fence, not for links' foreign-key
        # checks; the fence's FOR UPDATE waits for all of them.
        blob_row = sa.select(
            blobs.c.size, blobs.c.state, blobs.c.version, blobs.c.updated_at
        ).where(blobs.c.digest == b("digest"))
        self.lock_blob = blob_row.with_for_update(key_share=True)
        self.fence_lock = blob_row.with_for_update()
        # A marked blob that something links or leases again.
        self.revive = (
            sa.update(blobs)
            .where(blobs.c.digest == b("p_digest"), blobs.c.state == BlobState.MARKED.value)
            .values(state=BlobState.ACTIVE.value, version=blobs.c.version + 1, updated_at=b("now"))
        )

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
        # Served by the links' digest index (its entries carry the key's repository).
        self.linking_repositories = (
            sa.select(links.c.repository)
            .where(links.c.digest == b("digest"), links.c.repository > b("after"))
            .order_by(links.c.repository)
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
        # A repository's active sessions (the cap CreateSession enforces); by the index on
        # (repository, state).
        self.count_active_sessions = (
            sa.select(sa.func.count())
            .select_from(sessions)
            .where(
                sessions.c.repository == b("repository"),
                sessions.c.state == SessionState.ACTIVE.value,
            )
        )
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
        # A repository's uploads in progress, in id order (ListSessions), by the index on
        # (repository, state): the active sessions of one repository, which CreateSession caps.
        self.list_sessions = (
            sa.select(sessions)
            .where(
                sessions.c.repository == b("repository"),
                sessions.c.state == SessionState.ACTIVE.value,
                sessions.c.id > b("after"),
            )
            .order_by(sessions.c.id)
            .limit(b("limit"))
        )

        # --- leases and garbage collection (linksvc.lifecycle) ------------------------------
        self.add_lease = sa.insert(leases)
        # Link consumes a live lease of its digest (rowcount 1), or finds none.
        self.consume_lease = sa.delete(leases).where(
            leases.c.id == b("lease_id"),
            leases.c.digest == b("digest"),
            leases.c.expires_at > b("now"),
        )
        self.drop_lease = sa.delete(leases).where(leases.c.id == b("lease_id"))
        # ReleaseLease: the caller's own lease (by its id, of the digest it names), live or not.
        self.release_lease = sa.delete(leases).where(
            leases.c.id == b("lease_id"), leases.c.digest == b("digest")
        )
        self.drop_leases_of = sa.delete(leases).where(leases.c.digest == b("digest"))
        self.expire_leases = sa.delete(leases).where(leases.c.expires_at <= b("now"))
        linked = sa.exists().where(links.c.digest == blobs.c.digest)
        leased = sa.exists().where(
            leases.c.digest == blobs.c.digest, leases.c.expires_at > b("now")
        )
        self.has_link = sa.select(links.c.repository).where(links.c.digest == b("digest")).limit(1)
        self.has_live_lease = (
            sa.select(leases.c.id)
            .where(leases.c.digest == b("digest"), leases.c.expires_at > b("now"))
            .limit(1)
        )
        self.mark = (
            sa.update(blobs)
            .where(blobs.c.state == BlobState.ACTIVE.value, ~linked, ~leased)
            .values(state=BlobState.MARKED.value, version=blobs.c.version + 1, updated_at=b("now"))
        )
        self.unmark = (
            sa.update(blobs)
            .where(blobs.c.state == BlobState.MARKED.value, linked)
            .values(state=BlobState.ACTIVE.value, version=blobs.c.version + 1, updated_at=b("now"))
        )
        indexed = sa.select(
            blobs.c.digest, blobs.c.size, blobs.c.state, blobs.c.updated_at, blobs.c.version
        )
        self.list_blobs = (
            indexed.where(blobs.c.digest > b("after")).order_by(blobs.c.digest).limit(b("limit"))
        )
        self.collectable = self.list_blobs.where(
            sa.or_(
                sa.and_(
                    blobs.c.state == BlobState.MARKED.value,
                    blobs.c.updated_at <= b("marked_before"),
                ),
                sa.and_(
                    blobs.c.state == BlobState.DELETING.value,
                    blobs.c.updated_at <= b("deleting_before"),
                ),
            )
        )
        # The fence's change of state (and the takeover's), with the row as it is then.
        self.set_state = (
            sa.update(blobs)
            .where(blobs.c.digest == b("p_digest"))
            .values(state=b("p_state"), version=blobs.c.version + 1, updated_at=b("now"))
            .returning(blobs.c.size, blobs.c.state, blobs.c.version, blobs.c.updated_at)
        )
        self.forget = sa.delete(blobs).where(
            blobs.c.digest == b("digest"),
            blobs.c.state == BlobState.DELETING.value,
            blobs.c.version == b("version"),
        )
        # Taken when free, expired, or held by the same holder already (a renewal).
        new_lock = insert(runner_locks)
        self.acquire_runner_lock = new_lock.on_conflict_do_update(
            index_elements=[runner_locks.c.name],
            set_={"holder": new_lock.excluded.holder, "expires_at": new_lock.excluded.expires_at},
            where=sa.or_(
                runner_locks.c.expires_at <= b("now", type_=UtcDateTime()),
                runner_locks.c.holder == new_lock.excluded.holder,
            ),
        ).returning(runner_locks.c.holder, runner_locks.c.expires_at)
        self.runner_lock = sa.select(runner_locks.c.holder, runner_locks.c.expires_at).where(
            runner_locks.c.name == b("name")
        )
        self.release_runner_lock = sa.delete(runner_locks).where(
            runner_locks.c.name == b("name"), runner_locks.c.holder == b("holder")
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
        self.lock_blob = compiled(q.lock_blob)
        self.revive = compiled(q.revive)
        self.consume_lease = compiled(q.consume_lease)
        self.drop_lease = compiled(q.drop_lease)
        self.release_lease = compiled(q.release_lease)
        self.add_lease = compiled(q.add_lease)
        # One-statement versions, where the database can modify several tables in one.
        self.link_one: DriverQuery | None = None
        self.lease_one: DriverQuery | None = None
        self.mount_one_from: DriverQuery | None = None
        self.mount_one_from_any: DriverQuery | None = None
        if dialect.name == "postgresql":
            self.link_one = compiled(_text(_LINK_PG))
            self.lease_one = compiled(
                _text(_LEASE_PG).bindparams(sa.bindparam("expires_at", type_=UtcDateTime()))
            )
            self.mount_one_from = compiled(
                _text(_MOUNT_PG.format(source_filter="AND links.repository = :from_repository"))
            )
            self.mount_one_from_any = compiled(_text(_MOUNT_PG.format(source_filter="")))
