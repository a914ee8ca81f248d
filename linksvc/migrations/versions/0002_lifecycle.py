"""The data lifecycle (issue 10): blob states active/marked/deleting with a version, blob leases,
the runner lock.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def key(length: int) -> sa.types.TypeEngine[str]:
    """Bytewise-ordered string (the "C" collation on PostgreSQL), as in linksvc.models."""
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


def upgrade() -> None:
    # Every existing blob is live: "committed" becomes "active", at version 0.
    op.execute("UPDATE blobs SET state = 'active' WHERE state = 'committed'")
    # Batch mode: SQLite cannot add a CHECK constraint to a table; it recreates the table.
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(
            sa.Column("version", sa.BigInteger(), nullable=False, server_default=sa.text("0"))
        )
        batch.create_check_constraint(
            op.f("ck_blobs_state_known"), "state IN ('active', 'marked', 'deleting')"
        )
    op.create_table(
        "blob_leases",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("digest", key(135), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blob_leases")),
    )
    op.create_index(
        op.f("ix_blob_leases_digest_expires_at"), "blob_leases", ["digest", "expires_at"]
    )
    op.create_index(op.f("ix_blob_leases_expires_at"), "blob_leases", ["expires_at"])
    op.create_table(
        "runner_locks",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_runner_locks")),
    )


def downgrade() -> None:
    op.drop_table("runner_locks")
    op.drop_index(op.f("ix_blob_leases_expires_at"), table_name="blob_leases")
    op.drop_index(op.f("ix_blob_leases_digest_expires_at"), table_name="blob_leases")
    op.drop_table("blob_leases")
    with op.batch_alter_table("blobs") as batch:
        batch.drop_constraint(op.f("ck_blobs_state_known"), type_="check")
        batch.drop_column("version")
    # 0001 knows one state. (A deleting blob's bytes may be gone already: run the collector to
    # the end before downgrading.)
    op.execute("UPDATE blobs SET state = 'committed'")
