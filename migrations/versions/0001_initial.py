"""Initial schema: prompts, completions, choices, feedback, rankings, policies, runs.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[object]:
    return sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True), "postgresql"
    )


def _ts(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _checkpoint_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("parent", sa.String(64), nullable=True),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
    ]


def upgrade() -> None:
    _feedback_tables()
    _checkpoint_tables()


def _feedback_tables() -> None:
    op.create_table(
        "prompts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("messages", _json(), nullable=True),
        sa.Column("prompt_text", sa.Text(), nullable=False),
        sa.Column("prompt_token_ids", _json(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompts")),
        sa.UniqueConstraint("sha256", name="uq_prompts_sha256"),
    )
    op.create_table(
        "completions",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("policy_version", sa.String(64), nullable=False),
        sa.Column("params", _json(), nullable=False),
        sa.Column("user", sa.Text(), nullable=True),
        _ts("created_at"),
        sa.CheckConstraint("kind IN ('chat', 'text')", name=op.f("ck_completions_kind")),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name=op.f("fk_completions_prompt_id_prompts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_completions")),
    )
    op.create_index(op.f("ix_completions_prompt_id"), "completions", ["prompt_id"])
    op.create_table(
        "choices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("completion_id", sa.String(64), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("token_ids", _json(), nullable=False),
        sa.Column("logprobs", _json(), nullable=False),
        sa.Column("finish_reason", sa.String(16), nullable=False),
        sa.ForeignKeyConstraint(
            ["completion_id"],
            ["completions.id"],
            name=op.f("fk_choices_completion_id_completions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_choices")),
        sa.UniqueConstraint("completion_id", "index", name=op.f("uq_choices_completion_id_index")),
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.String(40), nullable=False),
        sa.Column("choice_id", sa.Integer(), nullable=False),
        sa.Column("rating", sa.String(4), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("user", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        _ts("created_at"),
        sa.CheckConstraint("rating IN ('up', 'down')", name=op.f("ck_feedback_rating")),
        sa.ForeignKeyConstraint(
            ["choice_id"], ["choices.id"], name=op.f("fk_feedback_choice_id_choices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_feedback_idempotency_key")),
        sa.UniqueConstraint("public_id", name=op.f("uq_feedback_public_id")),
    )
    op.create_index(op.f("ix_feedback_choice_id"), "feedback", ["choice_id"])
    op.create_table(
        "rankings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.String(40), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("user", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name=op.f("fk_rankings_prompt_id_prompts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rankings")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_rankings_idempotency_key")),
        sa.UniqueConstraint("public_id", name=op.f("uq_rankings_public_id")),
    )
    op.create_index(op.f("ix_rankings_prompt_id"), "rankings", ["prompt_id"])
    op.create_table(
        "ranking_items",
        sa.Column("ranking_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("choice_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["choice_id"], ["choices.id"], name=op.f("fk_ranking_items_choice_id_choices")
        ),
        sa.ForeignKeyConstraint(
            ["ranking_id"],
            ["rankings.id"],
            name=op.f("fk_ranking_items_ranking_id_rankings"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("ranking_id", "position", name=op.f("pk_ranking_items")),
    )
    op.create_index(op.f("ix_ranking_items_choice_id"), "ranking_items", ["choice_id"])


def _checkpoint_tables() -> None:
    op.create_table(
        "policy_versions",
        *_checkpoint_columns(),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metrics", _json(), nullable=False),
        _ts("created_at"),
        _ts("activated_at", nullable=True),
        sa.CheckConstraint(
            "status IN ('active', 'candidate', 'rejected', 'retired')",
            name=op.f("ck_policy_versions_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_versions")),
    )
    op.create_index(
        op.f("uq_policy_versions_one_active"),
        "policy_versions",
        ["status"],
        unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_table(
        "reward_models",
        *_checkpoint_columns(),
        sa.Column("metrics", _json(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reward_models")),
    )
    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("worker_id", sa.String(255), nullable=True),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        sa.Column("policy_id", sa.String(64), nullable=True),
        sa.Column("reward_model_id", sa.String(64), nullable=True),
        sa.Column("metrics", _json(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("feedback_watermark", sa.Integer(), nullable=True),
        sa.Column("rankings_watermark", sa.Integer(), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'rejected')",
            name=op.f("ck_training_runs_status"),
        ),
        sa.CheckConstraint(
            "trigger IN ('feedback', 'manual')", name=op.f("ck_training_runs_trigger")
        ),
        sa.ForeignKeyConstraint(
            ["policy_id"],
            ["policy_versions.id"],
            name=op.f("fk_training_runs_policy_id_policy_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["reward_model_id"],
            ["reward_models.id"],
            name=op.f("fk_training_runs_reward_model_id_reward_models"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_runs")),
    )
    op.create_index(op.f("ix_training_runs_status_id"), "training_runs", ["status", "id"])


def downgrade() -> None:
    for table in (
        "training_runs",
        "reward_models",
        "policy_versions",
        "ranking_items",
        "rankings",
        "feedback",
        "choices",
        "completions",
        "prompts",
    ):
        op.drop_table(table)
