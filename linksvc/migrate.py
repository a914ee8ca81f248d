"""Schema migrations of the link database: alembic, driven from Python.

``linkedblob migrate --db URL`` and ``linkedblob serve link --migrate`` call :func:`upgrade`;
the server checks :func:`schema_status` before it serves and refuses a database that is not at
head. The alembic environment and its revisions ship inside this package (``linksvc/migrations``),
and :func:`alembic_config` points alembic at them by their place on disk, so an installed
linkedblob (a wheel, no checkout) migrates from any working directory. In a checkout,
``alembic -x db=URL upgrade head`` from the repository root does the same through ``alembic.ini``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from alembic.config import Config

# The alembic environment (env.py, script.py.mako, versions/), package data of linksvc.
MIGRATIONS = Path(__file__).resolve().parent / "migrations"

# The revisions in linksvc/migrations/versions, oldest first: the last one is the head. The
# server checks a database against these without importing alembic (megabytes of a serving
# linksvc's memory that only --migrate needs; bench/README.md, "linksvc: alembic's memory"); a
# test compares them with alembic's own reading of the scripts, so a new migration that is not
# added here fails it.
REVISIONS = ("0001", "0002", "0003")
VERSION_TABLE = "alembic_version"  # alembic's default, as linksvc/migrations/env.py leaves it


# Alembic announces every plugin it loads at INFO; only the migrations themselves are news.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    # No ini file: nothing here depends on the working directory or on a checkout. (Only
    # alembic's command line configures logging from alembic.ini; a server keeps its own.)
    config = Config()
    # ConfigParser interpolates "%": a directory name containing one must be escaped.
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    # Passed as an attribute, not as sqlalchemy.url: ConfigParser would read "%" in a password
    # as interpolation.
    config.attributes["db_url"] = url
    config.attributes["configure_logger"] = False
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrades the database at ``url`` to ``revision`` (creating the schema when empty)."""
    from alembic import command

    _ensure_sqlite_directory(url)
    command.upgrade(alembic_config(url), revision)


def upgrade_in_child(url: str) -> str | None:
    """Runs :func:`upgrade` in a forked child process, so that alembic never enters the
    calling server's memory (bench/README.md, "linksvc: alembic's memory"). Returns None on
    success, else why it failed."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=_upgrade_and_report, args=(url, writer), name="migrate")
    child.start()
    writer.close()
    try:
        outcome: str | None = reader.recv()
    except EOFError:  # the child died before it could say
        outcome = f"the migration process exited with {child.exitcode}"
    child.join()
    return outcome


def _upgrade_and_report(url: str, report: Any) -> None:
    try:
        upgrade(url)
    except Exception as exc:
        report.send(f"{type(exc).__name__}: {exc}")
    else:
        report.send(None)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def head_revisions() -> set[str]:
    """The heads as alembic reads them from the scripts."""
    from alembic.script import ScriptDirectory

    return set(ScriptDirectory.from_config(alembic_config("")).get_heads())


def script_revisions() -> tuple[str, ...]:
    """Every revision as alembic reads them from the scripts, oldest first."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(""))
    return tuple(reversed([rev.revision for rev in script.walk_revisions()]))


@dataclass(frozen=True)
class SchemaStatus:
    current: set[str]
    heads: set[str]
    unknown: set[str]  # revisions this code does not have (a newer linksvc migrated the database)

    @property
    def at_head(self) -> bool:
        return self.current == self.heads

    def describe(self) -> str:
        needed = ", ".join(sorted(self.heads))
        if self.unknown:
            return (
                f"database is at revision {', '.join(sorted(self.unknown))}, which this linksvc "
                f"does not know (a newer linksvc migrated it); this one needs {needed}"
            )
        current = ", ".join(sorted(self.current)) or "no schema (empty database)"
        return f"database is at {current}; this linksvc needs {needed}"


def schema_status(connection: sa.Connection) -> SchemaStatus:
    """Where the database stands against REVISIONS (read from alembic's version table)."""
    current: set[str] = set()
    if sa.inspect(connection).has_table(VERSION_TABLE):
        version = sa.table(VERSION_TABLE, sa.column("version_num"))
        current = set(connection.execute(sa.select(version.c.version_num)).scalars())
    return SchemaStatus(current, {REVISIONS[-1]}, current - set(REVISIONS))


def _ensure_sqlite_directory(url: str) -> None:
    """SQLite creates the file but not its directory (`linkedblob up` on a fresh ./data)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
