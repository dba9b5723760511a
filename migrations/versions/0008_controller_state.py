"""Controller state in columns: the KL coefficient a version's PPO ended with, since when a
candidate waits for release, and a reward model's watermarks and split mark, filled in from the
metrics they were read back from.

Revision ID: 0008c
Revises: 0007v
Create Date: 2026-12-08
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008c"
down_revision: str | None = "0007v"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
# The metrics keys each column was read back from before 0008c (trainer_worker/cycle.py,
# feedback_store/policy_versions.py).
KL_COEF, KL_TARGET = "ppo/kl_coef", "ppo/kl_target"
WAITING = "release/waiting_since"  # unix seconds (feedback_store/policy_versions.py)
WATERMARKS = {"feedback_watermark": "reward/feedback_watermark",
              "rankings_watermark": "reward/rankings_watermark"}
SPLIT_MARK = "reward/trained_on_train_split"


def upgrade() -> None:
    with op.batch_alter_table("policy_versions") as batch:
        batch.add_column(sa.Column("kl_coef", sa.Float(), nullable=True))
        batch.add_column(sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("reward_models") as batch:
        batch.add_column(sa.Column("trained_on_train_split", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("feedback_watermark", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("rankings_watermark", sa.Integer(), nullable=True))
    # In Python over the rows: SQLite and PostgreSQL read JSON keys with different functions.
    _fill(sa.table("policy_versions", sa.column("id", sa.String()), sa.column("metrics", JSON),
                   sa.column("kl_coef", sa.Float()),
                   sa.column("waiting_since", sa.DateTime(timezone=True))), _policy_state)
    _fill(sa.table("reward_models", sa.column("id", sa.String()), sa.column("metrics", JSON),
                   sa.column("trained_on_train_split", sa.Boolean()),
                   *(sa.column(name, sa.Integer()) for name in WATERMARKS)), _reward_model_state)


def downgrade() -> None:
    with op.batch_alter_table("reward_models") as batch:
        for name in ("rankings_watermark", "feedback_watermark", "trained_on_train_split"):
            batch.drop_column(name)
    with op.batch_alter_table("policy_versions") as batch:
        batch.drop_column("waiting_since")
        batch.drop_column("kl_coef")


def _fill(table: sa.TableClause, state: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Set each row's new columns to what `state` finds in its metrics (none: left as added)."""
    bind = op.get_bind()
    for id, metrics in bind.execute(sa.select(table.c.id, table.c.metrics)).all():
        values = state(metrics if isinstance(metrics, dict) else {})
        if values:
            bind.execute(sa.update(table).where(table.c.id == id).values(**values))


def _policy_state(metrics: dict[str, Any]) -> dict[str, Any]:
    """The coefficient an adaptive controller (one that wrote its target) ended PPO with, and
    since when a candidate waits (the key is dropped when it leaves `candidate`)."""
    values: dict[str, Any] = {}
    coef = _number(metrics.get(KL_COEF)) if KL_TARGET in metrics else None
    if coef is not None:
        values["kl_coef"] = coef
    since = _number(metrics.get(WAITING))
    if since is not None:
        values["waiting_since"] = datetime.fromtimestamp(since, timezone.utc)
    return values


def _reward_model_state(metrics: dict[str, Any]) -> dict[str, Any]:
    marks = {column: _number(metrics.get(key)) for column, key in WATERMARKS.items()}
    values: dict[str, Any] = {column: int(mark) for column, mark in marks.items()
                              if mark is not None}
    if metrics.get(SPLIT_MARK):
        values["trained_on_train_split"] = True
    return values


def _number(value: Any) -> float | None:
    """A finite number stored in JSON, else None (a missing key, null, text)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
