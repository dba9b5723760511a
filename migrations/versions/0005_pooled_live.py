"""Live approval pooled across raters, per version, as the worker last computed it.

Revision ID: 0005p
Revises: 0004i
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005p"
down_revision: str | None = "0004i"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("pooled_up", "pooled_down", "pooled_variance", "raters", "pooled_at")


def upgrade() -> None:
    with op.batch_alter_table("policy_ratings") as batch:
        batch.add_column(sa.Column("pooled_up", sa.Float(), nullable=True))
        batch.add_column(sa.Column("pooled_down", sa.Float(), nullable=True))
        batch.add_column(sa.Column("pooled_variance", sa.Float(), nullable=True))
        batch.add_column(sa.Column("raters", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("pooled_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("policy_ratings") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
