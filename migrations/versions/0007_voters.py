"""Who votes: the key with `user` written with every thumb, so that a new vote finds the voter's
earlier one on the same answer by an index lookup instead of scanning the answer's votes.

Revision ID: 0007v
Revises: 0006r
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007v"
down_revision: str | None = "0006r"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE = "replaced_by IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("voter", sa.Text(), nullable=True))
    # flywheel/raters.py `Rater.voter`: "[key:<scope>/]user:<user>", or "anonymous" for no user.
    op.execute(sa.text(
        "UPDATE feedback SET voter = "
        "CASE WHEN key_scope IS NULL THEN '' ELSE 'key:' || key_scope || '/' END || "
        """CASE WHEN "user" IS NULL THEN 'anonymous' ELSE 'user:' || "user" END"""))
    op.drop_index("ix_feedback_live_choice", table_name="feedback")
    op.create_index("ix_feedback_live_vote", "feedback", ["choice_id", "voter"],
                    sqlite_where=sa.text(LIVE), postgresql_where=sa.text(LIVE))


def downgrade() -> None:
    op.drop_index("ix_feedback_live_vote", table_name="feedback")
    op.create_index("ix_feedback_live_choice", "feedback", ["choice_id"],
                    sqlite_where=sa.text(LIVE), postgresql_where=sa.text(LIVE))
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("voter")
