"""Implicit signals may train the reward model (`feedback.implicit_weight`): a reward model and a
training run record the last implicit-signal id their window reached, as they do for thumbs and
rankings. NULL (read as 0) on rows stored before.

Revision ID: 0011s
Revises: 0010k
Create Date: 2026-12-12
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011s"
down_revision: str | None = "0010k"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("reward_models", "training_runs")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("implicit_watermark", sa.Integer(), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("implicit_watermark")
