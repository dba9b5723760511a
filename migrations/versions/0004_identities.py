"""Per-identity limits: who gave each feedback event when `user` does not say (the API key's
digest), and each identity's agreement tallies and loss weight.

Revision ID: 0004i
Revises: 0003c
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004i"
down_revision: str | None = "0003c"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("feedback", "rankings"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("identity", sa.Text(), nullable=True))
    op.create_table(
        "identities",
        sa.Column("identity", sa.Text(), nullable=False),
        sa.Column("events", sa.Integer(), nullable=False),
        sa.Column("scored", sa.Integer(), nullable=False),
        sa.Column("agreed", sa.Integer(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("identity", name=op.f("pk_identities")),
    )


def downgrade() -> None:
    op.drop_table("identities")
    for table in ("rankings", "feedback"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("identity")
