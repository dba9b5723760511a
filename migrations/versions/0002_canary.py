"""Canary rollout and live approval: canary status and columns, per-version thumbs counters,
ranking ties, the stored held-out split of prompts, and `skipped` training runs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HOLDOUT_PERCENT = 20  # as feedback_store.training_data; frozen here, as a migration must be

POLICY_STATUSES_OLD = "status IN ('active', 'candidate', 'rejected', 'retired')"
POLICY_STATUSES_NEW = "status IN ('active', 'canary', 'candidate', 'rejected', 'retired')"
RUN_STATUSES_OLD = "status IN ('queued', 'running', 'succeeded', 'failed', 'rejected')"
RUN_STATUSES_NEW = (
    "status IN ('queued', 'running', 'succeeded', 'failed', 'rejected', 'skipped')"
)


def _holdout(sha256: str) -> bool:
    return int(sha256[:16], 16) % 100 < HOLDOUT_PERCENT


def upgrade() -> None:
    with op.batch_alter_table("policy_versions") as batch:
        batch.drop_constraint(op.f("ck_policy_versions_status"), type_="check")
        batch.create_check_constraint("status", sa.text(POLICY_STATUSES_NEW))
        batch.add_column(sa.Column("canary_fraction", sa.Float(), nullable=True))
        batch.add_column(sa.Column("canary_started_at", sa.DateTime(timezone=True),
                                   nullable=True))
        batch.add_column(sa.Column("canary_feedback_after", sa.Integer(), nullable=True))
    op.create_index(
        "uq_policy_versions_one_canary",
        "policy_versions",
        ["status"],
        unique=True,
        sqlite_where=sa.text("status = 'canary'"),
        postgresql_where=sa.text("status = 'canary'"),
    )
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_constraint(op.f("ck_training_runs_status"), type_="check")
        batch.create_check_constraint("status", sa.text(RUN_STATUSES_NEW))

    op.create_table(
        "policy_ratings",
        sa.Column("policy_version", sa.String(64), nullable=False),
        sa.Column("up", sa.Integer(), nullable=False),
        sa.Column("down", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("policy_version", name=op.f("pk_policy_ratings")),
    )
    op.execute(
        "INSERT INTO policy_ratings (policy_version, up, down) "
        "SELECT completions.policy_version, "
        "SUM(CASE WHEN feedback.rating = 'up' THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN feedback.rating = 'down' THEN 1 ELSE 0 END) "
        "FROM feedback JOIN choices ON choices.id = feedback.choice_id "
        "JOIN completions ON completions.id = choices.completion_id "
        "GROUP BY completions.policy_version"
    )

    with op.batch_alter_table("ranking_items") as batch:
        batch.add_column(sa.Column("tier", sa.Integer(), nullable=True))
    op.execute("UPDATE ranking_items SET tier = position")
    with op.batch_alter_table("ranking_items") as batch:
        batch.alter_column("tier", existing_type=sa.Integer(), nullable=False)

    with op.batch_alter_table("prompts") as batch:
        batch.add_column(sa.Column("holdout", sa.Boolean(), nullable=True))
    conn = op.get_bind()
    prompts = sa.table("prompts", sa.column("id", sa.Integer()), sa.column("sha256"),
                       sa.column("holdout", sa.Boolean()))
    held = [pid for pid, sha in conn.execute(sa.select(prompts.c.id, prompts.c.sha256))
            if _holdout(sha)]
    conn.execute(sa.update(prompts).values(holdout=False))
    for start in range(0, len(held), 500):
        conn.execute(sa.update(prompts).where(prompts.c.id.in_(held[start:start + 500]))
                     .values(holdout=True))
    with op.batch_alter_table("prompts") as batch:
        batch.alter_column("holdout", existing_type=sa.Boolean(), nullable=False)
    op.create_index(op.f("ix_prompts_holdout"), "prompts", ["holdout"])


def downgrade() -> None:
    op.drop_index(op.f("ix_prompts_holdout"), table_name="prompts")
    with op.batch_alter_table("prompts") as batch:
        batch.drop_column("holdout")
    with op.batch_alter_table("ranking_items") as batch:
        batch.drop_column("tier")
    op.drop_table("policy_ratings")
    op.execute("UPDATE training_runs SET status = 'rejected' WHERE status = 'skipped'")
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_constraint(op.f("ck_training_runs_status"), type_="check")
        batch.create_check_constraint("status", sa.text(RUN_STATUSES_OLD))
    op.drop_index("uq_policy_versions_one_canary", table_name="policy_versions")
    op.execute("UPDATE policy_versions SET status = 'candidate' WHERE status = 'canary'")
    with op.batch_alter_table("policy_versions") as batch:
        batch.drop_column("canary_feedback_after")
        batch.drop_column("canary_started_at")
        batch.drop_column("canary_fraction")
        batch.drop_constraint(op.f("ck_policy_versions_status"), type_="check")
        batch.create_check_constraint("status", sa.text(POLICY_STATUSES_OLD))
