"""Implicit feedback: what a user did with an answer without rating it (asked again, edited the
question and sent it again, copied the answer), one row per signal.

Revision ID: 0009i
Revises: 0008c
Create Date: 2026-12-09
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009i"
down_revision: str | None = "0008c"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "implicit_feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.String(40), nullable=False),
        sa.Column("choice_id", sa.Integer(), nullable=False),
        sa.Column("signal", sa.String(16), nullable=False),
        sa.Column("user", sa.Text(), nullable=True),
        sa.Column("identity", sa.Text(), nullable=True),
        sa.Column("key_scope", sa.String(16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("signal IN ('regenerate', 'edit', 'copy')",
                           name=op.f("ck_implicit_feedback_signal")),
        sa.ForeignKeyConstraint(["choice_id"], ["choices.id"],
                                name=op.f("fk_implicit_feedback_choice_id_choices")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_implicit_feedback")),
        sa.UniqueConstraint("public_id", name=op.f("uq_implicit_feedback_public_id")),
    )
    op.create_index(op.f("ix_implicit_feedback_choice_id"), "implicit_feedback", ["choice_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_implicit_feedback_choice_id"), table_name="implicit_feedback")
    op.drop_table("implicit_feedback")
