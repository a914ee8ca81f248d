"""Initial schema: repositories, blobs, links, upload sessions.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def key(length: int) -> sa.types.TypeEngine[str]:
    """Bytewise-ordered string (the "C" collation on PostgreSQL), as in linksvc.models."""
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "repositories",
        sa.Column("name", key(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_repositories")),
    )
    op.create_table(
        "blobs",
        sa.Column("digest", key(135), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("size >= 0", name=op.f("ck_blobs_size_not_negative")),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_blobs")),
    )
    op.create_index(op.f("ix_blobs_state_updated_at"), "blobs", ["state", "updated_at"])
    op.create_table(
        "links",
        sa.Column("repository", key(255), nullable=False),
        sa.Column("digest", key(135), nullable=False),
        sa.Column("media_type", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["repository"],
            ["repositories.name"],
            name=op.f("fk_links_repository_repositories"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["digest"],
            ["blobs.digest"],
            name=op.f("fk_links_digest_blobs"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("repository", "digest", name=op.f("pk_links")),
    )
    op.create_index(op.f("ix_links_digest"), "links", ["digest"])
    op.create_table(
        "upload_sessions",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("repository", key(255), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.CheckConstraint("size >= 0", name=op.f("ck_upload_sessions_size_not_negative")),
        sa.CheckConstraint(
            "state IN ('active', 'committed', 'cancelled')",
            name=op.f("ck_upload_sessions_state_known"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_upload_sessions")),
    )
    op.create_index(op.f("ix_upload_sessions_updated_at"), "upload_sessions", ["updated_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_upload_sessions_updated_at"), table_name="upload_sessions")
    op.drop_table("upload_sessions")
    op.drop_index(op.f("ix_links_digest"), table_name="links")
    op.drop_table("links")
    op.drop_index(op.f("ix_blobs_state_updated_at"), table_name="blobs")
    op.drop_table("blobs")
    op.drop_table("repositories")
