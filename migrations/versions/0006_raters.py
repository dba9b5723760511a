"""Raters bound to keys: the API key that received each answer and gave each piece of feedback,
and the thumbs a later vote by the same rater replaced.

Revision ID: 0006r
Revises: 0005p
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006r"
down_revision: str | None = "0005p"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("completions") as batch:
        batch.add_column(sa.Column("key_scope", sa.String(16), nullable=True))
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("key_scope", sa.String(16), nullable=True))
        batch.add_column(sa.Column("replaced_by", sa.Integer(), nullable=True))
    with op.batch_alter_table("rankings") as batch:
        batch.add_column(sa.Column("key_scope", sa.String(16), nullable=True))
    op.create_index("ix_feedback_live_choice", "feedback", ["choice_id"],
                    sqlite_where=sa.text("replaced_by IS NULL"),
                    postgresql_where=sa.text("replaced_by IS NULL"))
    with op.batch_alter_table("policy_versions") as batch:
        batch.add_column(sa.Column("canary_unit", sa.String(8), nullable=True))
    # Rows stored before keys were bound: a keyed row without `user` named its key's scope.
    for table in ("feedback", "rankings"):
        op.execute(sa.text(f"UPDATE {table} SET key_scope = substr(identity, 5) "
                           "WHERE identity LIKE 'key:%'"))


def downgrade() -> None:
    op.drop_index("ix_feedback_live_choice", table_name="feedback")
    for table, columns in (("policy_versions", ("canary_unit",)), ("rankings", ("key_scope",)),
                           ("feedback", ("replaced_by", "key_scope")),
                           ("completions", ("key_scope",))):
        with op.batch_alter_table(table) as batch:
            for name in columns:
                batch.drop_column(name)
