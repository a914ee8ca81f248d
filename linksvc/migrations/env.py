"""Alembic environment of the link database.

The database URL comes from, in order: ``alembic -x db=URL``, the ``db_url`` attribute that
``linksvc.migrate`` passes, or the LINKEDBLOB_DB environment variable.
"""

from __future__ import annotations

import logging.config
import os

import sqlalchemy as sa
from alembic import context

from linksvc.models import metadata

# Serializes concurrent migrations on PostgreSQL (several linksvc replicas started with
# --migrate, or a migration Job racing one): an arbitrary, fixed advisory-lock key.
PG_MIGRATION_LOCK = 0x6C696E6B  # "link"

config = context.config

# Only the alembic command line configures logging from alembic.ini; a server migrating on start
# keeps its own (JSON) logging.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("db")
    url = url or config.attributes.get("db_url") or os.environ.get("LINKEDBLOB_DB")
    if not url:
        raise SystemExit(
            "no database given: use `alembic -x db=URL ...`, LINKEDBLOB_DB=URL, "
            "or `linkedblob migrate --db URL`"
        )
    return str(url)


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = sa.create_engine(database_url(), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=metadata,
                # SQLite cannot ALTER most things; batch mode recreates the table instead.
                render_as_batch=True,
                compare_type=True,
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    connection.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK}
                    )
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
