"""Each answer records the version that wrote it: a canary assigned per request answers one
request from both versions, and every thumb is counted by its answer's version. Rows stored
before keep NULL, read as their completion's version (`feedback_store.models.answer_version`):
no backfill, so the column arrives without rewriting or locking a large table, and servers still
on the code before it go on storing answers (NULL: their completion's, which is right for them).
A downgrade forgets which arm wrote each answer of a split request: they then count for their
completion's version, while the live counters (policy_ratings) keep what they counted.

Revision ID: 0012v
Revises: 0011s
Create Date: 2026-12-13
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012v"
down_revision: str | None = "0011s"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("choices") as batch:
        batch.add_column(sa.Column("policy_version", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("choices") as batch:
        batch.drop_column("policy_version")
