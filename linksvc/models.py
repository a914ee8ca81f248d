"""The schema: SQLAlchemy Core tables for repositories, blobs, links, upload sessions, blob
leases and the runner lock.

The migrations in ``linksvc/migrations/versions`` create exactly this schema; a test fails when
the two disagree (alembic autogenerate finds a difference), so change both together.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from linkedblob.names import MAX_MEDIA_TYPE_LENGTH

# Constraint and index names are fixed by convention so migrations can refer to them by name
# (and SQLite's batch migrations can recreate them).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

# Longest digest: "sha512:" + 128 hex characters.
DIGEST_LENGTH = 135
NAME_LENGTH = 255
MEDIA_TYPE_LENGTH = MAX_MEDIA_TYPE_LENGTH  # the grammar allows no longer one
SESSION_ID_LENGTH = 128
LEASE_ID_LENGTH = 128
RUNNER_NAME_LENGTH = 255


def _key(length: int) -> sa.types.TypeEngine[str]:
    """A string that is compared and ordered bytewise on every database.

    Digests and repository names are ASCII; the "C" collation on PostgreSQL gives the same
    order as SQLite's BINARY (so paging is identical on both) and the cheapest comparisons.
    """
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """An aware UTC datetime on both databases.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so the value is stored as naive
    UTC text (which also orders correctly) and read back as aware UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


class BlobState(enum.StrEnum):
    """The lifecycle of an indexed blob (docs/design.md#lifecycle; revision 0002)."""

    ACTIVE = "active"  # recorded after blobsvc committed the bytes (was "committed")
    MARKED = "marked"  # no link and no live lease when garbage collection last looked
    DELETING = "deleting"  # fenced: its bytes are being deleted; nothing may link it


class SessionState(enum.StrEnum):
    ACTIVE = "active"
    COMMITTED = "committed"
    CANCELLED = "cancelled"


repositories = sa.Table(
    "repositories",
    metadata,
    sa.Column("name", _key(NAME_LENGTH), primary_key=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
)

blobs = sa.Table(
    "blobs",
    metadata,
    sa.Column("digest", _key(DIGEST_LENGTH), primary_key=True),
    sa.Column("size", sa.BigInteger(), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    # When the blob entered its state.
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    # Bumped on every change of state: the compare-and-set token of FenceBlob and ForgetBlob.
    sa.Column("version", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
    sa.CheckConstraint("size >= 0", name="size_not_negative"),
    sa.CheckConstraint("state IN ('active', 'marked', 'deleting')", name="state_known"),
    # Garbage collection looks for blobs in a state that are older than a grace period.
    sa.Index(None, "state", "updated_at"),
)

links = sa.Table(
    "links",
    metadata,
    sa.Column(
        "repository",
        _key(NAME_LENGTH),
        sa.ForeignKey("repositories.name", ondelete="RESTRICT"),
        primary_key=True,
    ),
    # RESTRICT: the database itself refuses to drop a blob that a repository links.
    sa.Column(
        "digest",
        _key(DIGEST_LENGTH),
        sa.ForeignKey("blobs.digest", ondelete="RESTRICT"),
        primary_key=True,
    ),
    sa.Column("media_type", sa.String(MEDIA_TYPE_LENGTH), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    # Mount from any repository, and "is this blob referenced at all" (garbage collection).
    sa.Index(None, "digest"),
)

upload_sessions = sa.Table(
    "upload_sessions",
    metadata,
    sa.Column("id", sa.String(SESSION_ID_LENGTH), primary_key=True),
    # No foreign key: a repository comes into being with its first link, after its first upload.
    sa.Column("repository", _key(NAME_LENGTH), nullable=False),
    sa.Column("started_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    sa.Column("size", sa.BigInteger(), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.CheckConstraint("size >= 0", name="size_not_negative"),
    sa.CheckConstraint("state IN ('active', 'committed', 'cancelled')", name="state_known"),
    # Stale sessions, oldest first (purging).
    sa.Index(None, "updated_at"),
    # A repository's active sessions, counted when one is created (the per-repository cap).
    sa.Index(None, "repository", "state"),
)

# A lease protects a digest from garbage collection while its bytes are committed and linked
# (Lease, consumed by Link). No foreign key: the blob is usually not recorded yet.
blob_leases = sa.Table(
    "blob_leases",
    metadata,
    sa.Column("id", sa.String(LEASE_ID_LENGTH), primary_key=True),
    sa.Column("digest", _key(DIGEST_LENGTH), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("expires_at", UtcDateTime(), nullable=False),
    # "Has this digest a live lease?" (the fence, the mark), and the expired ones (housekeeping).
    sa.Index(None, "digest", "expires_at"),
    sa.Index(None, "expires_at"),
)

# The collectors' lock (AcquireRunnerLock): one named row, held until it expires.
runner_locks = sa.Table(
    "runner_locks",
    metadata,
    sa.Column("name", sa.String(RUNNER_NAME_LENGTH), primary_key=True),
    sa.Column("holder", sa.String(RUNNER_NAME_LENGTH), nullable=False),
    sa.Column("expires_at", UtcDateTime(), nullable=False),
)
