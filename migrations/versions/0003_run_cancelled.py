"""Operating it: `cancelled` training runs (stopped by a shutdown, not failed), and an index on
feedback time for the console's hourly charts.

Revision ID: 0003c
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003c"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RUN_STATUSES_OLD = (
    "status IN ('queued', 'running', 'succeeded', 'failed', 'rejected', 'skipped')"
)
RUN_STATUSES_NEW = (
    "status IN ('queued', 'running', 'succeeded', 'failed', 'rejected', 'skipped', 'cancelled')"
)


def upgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_constraint(op.f("ck_training_runs_status"), type_="check")
        batch.create_check_constraint("status", sa.text(RUN_STATUSES_NEW))
    op.create_index(op.f("ix_feedback_created_at"), "feedback", ["created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_feedback_created_at"), table_name="feedback")
    op.execute("UPDATE training_runs SET status = 'failed' WHERE status = 'cancelled'")
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_constraint(op.f("ck_training_runs_status"), type_="check")
        batch.create_check_constraint("status", sa.text(RUN_STATUSES_OLD))
