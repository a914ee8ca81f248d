"""linksvc's schema: the migrations against the models, up and down, from every entry point, and
an index behind every lookup the API makes. On SQLite and on PostgreSQL (the db_url fixture)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from linksvc import migrate
from linksvc.models import metadata
from linksvc.queries import DriverQuery, Queries

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TABLES = {"repositories", "blobs", "links", "upload_sessions", "blob_leases", "runner_locks"}
INDEXES = {
    "blobs": {"ix_blobs_state_updated_at"},
    "blob_leases": {"ix_blob_leases_digest_expires_at", "ix_blob_leases_expires_at"},
    "links": {"ix_links_digest"},
    "upload_sessions": {"ix_upload_sessions_updated_at"},
}


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


def tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}


def revision(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return migrate.schema_status(conn).current


def schema_diff(engine: sa.Engine, target: sa.MetaData) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, target))


def test_upgrade_to_head_and_down_to_base(db_url: str, engine: sa.Engine) -> None:
    assert tables(engine) == set()
    migrate.upgrade(db_url)
    assert tables(engine) == TABLES
    assert revision(engine) == migrate.head_revisions()
    inspector = sa.inspect(engine)
    for table, wanted in INDEXES.items():
        assert wanted <= {ix["name"] for ix in inspector.get_indexes(table)}
    assert inspector.get_pk_constraint("links")["constrained_columns"] == ["repository", "digest"]

    migrate.upgrade(db_url)  # at head already: nothing to do
    assert revision(engine) == migrate.head_revisions()

    migrate.downgrade(db_url, "base")
    assert tables(engine) == set()
    assert revision(engine) == set()
    migrate.upgrade(db_url)  # and back up on the downgraded database
    assert tables(engine) == TABLES


def test_existing_rows_come_through_0002_and_back(db_url: str, engine: sa.Engine) -> None:
    """A committed blob of 0001 becomes active at version 0; the downgrade maps every state back
    to committed and drops what 0002 added."""
    migrate.upgrade(db_url, "0001")
    when = datetime(2026, 1, 1, tzinfo=UTC)
    blobs = sa.table(
        "blobs", *(sa.column(c) for c in ("digest", "size", "state", "created_at", "updated_at"))
    )
    with engine.begin() as conn:
        conn.execute(
            sa.insert(blobs),
            [
                {"digest": d, "size": 3, "state": "committed", "created_at": when,
                 "updated_at": when}
                for d in (DIGEST, OTHER)
            ],
        )  # fmt: skip
        conn.execute(sa.text("INSERT INTO repositories VALUES ('r', :t)"), {"t": when})
        conn.execute(
            sa.text("INSERT INTO links VALUES ('r', :d, 'a/b', :t)"), {"d": DIGEST, "t": when}
        )
    migrate.upgrade(db_url)
    assert tables(engine) == TABLES
    with engine.begin() as conn:
        states = conn.execute(sa.text("SELECT digest, state, version FROM blobs ORDER BY 1")).all()
        assert [tuple(r) for r in states] == [(DIGEST, "active", 0), (OTHER, "active", 0)]
        assert conn.execute(sa.text("SELECT count(*) FROM links")).scalar() == 1
        # The check constraint holds on both databases.
        with pytest.raises(sa.exc.IntegrityError), conn.begin_nested():
            conn.execute(sa.text("UPDATE blobs SET state = 'committed'"))
        conn.execute(sa.text("UPDATE blobs SET state = 'deleting', version = 2 WHERE digest = :d"),
                     {"d": OTHER})  # fmt: skip
        conn.execute(
            sa.text("INSERT INTO blob_leases VALUES ('l', :d, :t, :t)"), {"d": OTHER, "t": when}
        )

    migrate.downgrade(db_url, "0001")
    assert tables(engine) == {"repositories", "blobs", "links", "upload_sessions"}
    with engine.connect() as conn:
        states = conn.execute(sa.text("SELECT * FROM blobs ORDER BY 1")).all()
        assert [(r.digest, r.state) for r in states] == [
            (DIGEST, "committed"),
            (OTHER, "committed"),
        ]
        assert "version" not in states[0]._fields
    assert schema_diff(engine, metadata) != []  # 0001 is not the models' schema
    migrate.upgrade(db_url)
    assert schema_diff(engine, metadata) == []


def test_schema_status_tells_empty_current_and_newer(db_url: str, engine: sa.Engine) -> None:
    with engine.connect() as conn:
        empty = migrate.schema_status(conn)
    assert not empty.at_head and "empty database" in empty.describe()
    migrate.upgrade(db_url)
    with engine.connect() as conn:
        assert migrate.schema_status(conn).at_head
    with engine.begin() as conn:  # as if a newer linksvc had migrated it
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    with engine.connect() as conn:
        newer = migrate.schema_status(conn)
    assert not newer.at_head and newer.unknown == {"9999_future"}
    assert "newer linksvc" in newer.describe()


def test_the_server_knows_the_revisions_alembic_knows() -> None:
    """The server checks a database against linksvc.migrate.REVISIONS without alembic: a new
    migration must be listed there too."""
    assert migrate.script_revisions() == migrate.REVISIONS
    assert migrate.head_revisions() == {migrate.REVISIONS[-1]}


def test_serving_sqlite_needs_neither_alembic_nor_psycopg() -> None:
    """What linksvc imports to serve an SQLite database (without --migrate): each of alembic and
    psycopg would add ~10 MiB to its memory."""
    code = (
        "import sys\n"
        "from linksvc import server\n"
        "from linksvc.database import Database\n"
        "from linksvc.store import LinkStore\n"
        "LinkStore(Database('sqlite://'))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'alembic', 'psycopg'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_models_and_migrations_agree(db_url: str, engine: sa.Engine) -> None:
    migrate.upgrade(db_url)
    assert schema_diff(engine, metadata) == []

    # The comparison sees a difference when there is one (else the assertion above is empty).
    changed = sa.MetaData(naming_convention=metadata.naming_convention)
    for table in metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["blobs"].append_column(sa.Column("extra", sa.Integer(), nullable=True))
    sa.Index("ix_links_created_at", changed.tables["links"].c.created_at)
    kinds = {entry[0] for entry in schema_diff(engine, changed) if isinstance(entry, tuple)}
    assert {"add_column", "add_index"} <= kinds


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_alembic_and_linkedblob_migrate_command_lines(db_url: str, engine: sa.Engine) -> None:
    env_without_db = {k: v for k, v in os.environ.items() if k != "LINKEDBLOB_DB"}
    no_db = subprocess.run(
        [str(BIN / "alembic"), "upgrade", "head"],
        cwd=ROOT,
        env=env_without_db,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert no_db.returncode != 0
    assert "no database given" in no_db.stderr
    assert tables(engine) == set()

    up = run_cli(str(BIN / "alembic"), "-x", f"db={db_url}", "upgrade", "head")
    assert up.returncode == 0, up.stderr
    assert revision(engine) == migrate.head_revisions()

    down = run_cli(str(BIN / "alembic"), "downgrade", "base", env={"LINKEDBLOB_DB": db_url})
    assert down.returncode == 0, down.stderr
    assert tables(engine) == set()

    cli = run_cli(str(BIN / "linkedblob"), "migrate", "--db", db_url)
    assert cli.returncode == 0, cli.stderr
    assert revision(engine) == migrate.head_revisions()
    assert tables(engine) == TABLES


# --- every lookup is served by a key or an index ------------------------------------------

NOW = datetime(2026, 1, 1, tzinfo=UTC)
DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64
# The statements that find rows, with example parameters (inserts need no plan).
LOOKUPS: dict[str, dict[str, object]] = {
    "blob": {"digest": DIGEST},
    "resolve": {"repository": "r", "digest": DIGEST},
    "set_media_type": {"p_repository": "r", "p_digest": DIGEST, "p_media_type": "a/b"},
    "mount_from": {"digest": DIGEST, "from_repository": "r"},
    "mount_from_any": {"digest": DIGEST},
    "unlink": {"repository": "r", "digest": DIGEST},
    "list_links": {"repository": "r", "after": "", "limit": 10},
    "list_repositories": {"after": "", "limit": 10},
    "linking_repositories": {"digest": DIGEST, "after": "", "limit": 10},
    "link_recorded": {"repository": "r", "digest": DIGEST, "media_type": "", "created_at": NOW},
    "get_session": {"id": "s"},
    "count_active_sessions": {"repository": "r"},
    "list_sessions": {"repository": "r", "after": "", "limit": 10},
    "advance_session": {"p_id": "s", "from_size": 0, "to_size": 1, "now": NOW},
    "finish_session": {"p_id": "s", "p_state": "committed", "now": NOW},
    "finish_session_of": {"p_id": "s", "p_state": "committed", "now": NOW, "p_repository": "r"},
    "stale_sessions": {"cutoff": NOW, "limit": 10},
    "purge_session": {"id": "s"},
    "lock_blob": {"digest": DIGEST},
    "fence_lock": {"digest": DIGEST},
    "revive": {"p_digest": DIGEST, "now": NOW},
    "consume_lease": {"lease_id": "l", "digest": DIGEST, "now": NOW},
    "drop_lease": {"lease_id": "l"},
    "release_lease": {"lease_id": "l", "digest": DIGEST},
    "drop_leases_of": {"digest": DIGEST},
    "expire_leases": {"now": NOW},
    "has_link": {"digest": DIGEST},
    "has_live_lease": {"digest": DIGEST, "now": NOW},
    "mark": {"now": NOW},
    "unmark": {"now": NOW},
    "list_blobs": {"after": "", "limit": 10},
    "collectable": {"marked_before": NOW, "deleting_before": NOW, "after": "", "limit": 10},
    "set_state": {"p_digest": DIGEST, "p_state": "deleting", "now": NOW},
    "forget": {"digest": DIGEST, "version": 1},
    "runner_lock": {"name": "gc"},
    "release_runner_lock": {"name": "gc", "holder": "h"},
}


def query_plan(conn: sa.Connection, statement: Any, params: dict[str, object]) -> str:
    compiled = statement.compile(dialect=conn.dialect)
    bound = compiled.construct_params(params)
    if conn.dialect.name == "sqlite":
        # Stored as naive UTC text (see models.UtcDateTime).
        bound = {
            k: v.replace(tzinfo=None).isoformat(" ") if isinstance(v, datetime) else v
            for k, v in bound.items()
        }
        positional = tuple(bound[name] for name in compiled.positiontup or ())
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", positional).all()
        return "\n".join(str(row[-1]) for row in rows)
    rows = conn.exec_driver_sql(f"EXPLAIN {compiled}", bound).all()
    return "\n".join(str(row[0]) for row in rows)


def test_every_lookup_uses_a_key_or_an_index(db_url: str, engine: sa.Engine) -> None:
    migrate.upgrade(db_url)
    queries = Queries(engine.dialect)
    statements = {n for n, q in vars(queries).items() if isinstance(q, sa.Executable)}
    inserts = {
        "record_blob",
        "add_repository",
        "add_link",
        "create_session",
        "add_lease",
        "acquire_runner_lock",
    }
    assert set(LOOKUPS) | inserts == statements, "a new statement needs an entry in LOOKUPS"
    with engine.connect() as conn:
        for name, params in LOOKUPS.items():
            if conn.dialect.name == "postgresql":
                # Empty tables make a sequential scan the cheapest plan; forbid it to see whether
                # an index can serve the lookup at all. (SET lasts until the rollback below.)
                conn.exec_driver_sql("SET enable_seqscan = off")
            plan = query_plan(conn, getattr(queries, name), params)
            if conn.dialect.name == "sqlite":
                # SEARCH: a key or index lookup; SCAN: every row of a table (or of an index).
                scans = [line for line in plan.splitlines() if line.startswith("SCAN")]
                assert not scans, f"{name} scans a table:\n{plan}"
            else:
                assert "Seq Scan" not in plan, f"{name} scans a table:\n{plan}"
            conn.rollback()


# The one-statement hot paths of PostgreSQL (see linksvc.queries), with example parameters.
DRIVER_LOOKUPS: dict[str, dict[str, object]] = {
    "link_one": {
        "repository": "r",
        "digest": DIGEST,
        "size": 1,
        "media_type": "",
        "lease_id": "l",
        "now": NOW,
    },
    "mount_one_from": {
        "repository": "r",
        "from_repository": "s",
        "digest": DIGEST,
        "media_type": "",
        "now": NOW,
    },
    "mount_one_from_any": {"repository": "r", "digest": DIGEST, "media_type": "", "now": NOW},
    "lease_one": {
        "digest": DIGEST,
        "repository": "r",
        "size": 1,
        "media_type": "",
        "lease_id": "l",
        "now": NOW,
        "expires_at": NOW,
    },
}


def test_one_statement_paths_use_keys_and_indexes(db_url: str, engine: sa.Engine) -> None:
    migrate.upgrade(db_url)
    driver = Queries(engine.dialect).driver
    if engine.dialect.name == "sqlite":
        # SQLite modifies one table per statement: it runs the general path only.
        assert all(getattr(driver, name) is None for name in DRIVER_LOOKUPS)
        return
    with engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")
        for name, params in DRIVER_LOOKUPS.items():
            query = getattr(driver, name)
            assert isinstance(query, DriverQuery)
            # EXPLAIN plans the statement without running it.
            rows = conn.exec_driver_sql(f"EXPLAIN {query.sql}", query.parameters(params)).all()
            plan = "\n".join(str(row[0]) for row in rows)
            assert "Seq Scan" not in plan, f"{name} scans a table:\n{plan}"
        conn.rollback()
