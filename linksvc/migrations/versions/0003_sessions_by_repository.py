"""Sessions by repository and state: linksvc counts a repository's active upload sessions when
it creates one (--max-sessions-per-repository).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_upload_sessions_repository_state"), "upload_sessions", ["repository", "state"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_upload_sessions_repository_state"), table_name="upload_sessions")
