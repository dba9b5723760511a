"""One vote per voter per answer for rankings too: a ranking records its voter (the key with
`user`), and a later ranking by the same voter of any of the same answers replaces it.

Revision ID: 0010k
Revises: 0009i
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010k"
down_revision: str | None = "0009i"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE = "replaced_by IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("rankings") as batch:
        batch.add_column(sa.Column("voter", sa.Text(), nullable=True))
        batch.add_column(sa.Column("replaced_by", sa.Integer(), nullable=True))
    # flywheel/raters.py `Rater.voter`, as 0007v wrote it for thumbs. Earlier rankings all stay
    # live: they were given under the old rule.
    op.execute(sa.text(
        "UPDATE rankings SET voter = "
        "CASE WHEN key_scope IS NULL THEN '' ELSE 'key:' || key_scope || '/' END || "
        """CASE WHEN "user" IS NULL THEN 'anonymous' ELSE 'user:' || "user" END"""))
    op.create_index("ix_rankings_live_vote", "rankings", ["prompt_id", "voter"],
                    sqlite_where=sa.text(LIVE), postgresql_where=sa.text(LIVE))


def downgrade() -> None:
    op.drop_index("ix_rankings_live_vote", table_name="rankings")
    with op.batch_alter_table("rankings") as batch:
        batch.drop_column("replaced_by")
        batch.drop_column("voter")
