"""Reward model checkpoints, newest last."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc

from feedback_store.base import StoreBase, unix, utcnow
from feedback_store.errors import InvalidInputError
from feedback_store.models import RewardModel
from feedback_store.policy_versions import _max_number, _newest_first
from feedback_store.types import Marks, RewardModelState


class RewardModelsMixin(StoreBase):
    """The reward models the worker trained."""

    def next_reward_model_id(self) -> str:
        """`rm-N`, numbered from 1."""
        with self._tx(write=False) as s:
            return f"rm-{max(_max_number(s.scalars(sa.select(RewardModel.id))), 0) + 1}"

    def add_reward_model(
        self,
        *,
        id: str,
        parent: str | None,
        path: str | None,
        sha256: str | None,
        metrics: dict[str, Any] | None = None,
        watermark: Marks | None = None,
        trained_on_train_split: bool = False,
    ) -> dict[str, Any]:
        """Record a new reward model checkpoint with the watermark of its training window."""
        try:
            with self._tx() as s:
                row = RewardModel(
                    id=id,
                    parent=parent,
                    path=path,
                    sha256=sha256,
                    metrics=dict(metrics or {}),
                    created_at=utcnow(),
                    trained_on_train_split=trained_on_train_split,
                )
                if watermark is not None:
                    row.watermark = watermark
                s.add(row)
                s.flush()
                return _reward_model_record(row)
        except exc.IntegrityError as error:
            raise InvalidInputError(
                f"Reward model '{id}' already exists", param="id", code="reward_model_exists"
            ) from error

    def latest_reward_model(self) -> dict[str, Any] | None:
        with self._tx(write=False) as s:
            rows = _newest_first(s.scalars(sa.select(RewardModel)))
            return _reward_model_record(rows[0]) if rows else None

    def latest_reward_model_state(self) -> RewardModelState | None:
        """The newest reward model as the next cycle starts from it; None before the first."""
        with self._tx(write=False) as s:
            rows = _newest_first(s.scalars(sa.select(RewardModel)))
            if not rows:
                return None
            return RewardModelState(id=rows[0].id, path=rows[0].path, watermark=rows[0].watermark,
                                    trained_on_train_split=rows[0].trained_on_train_split)


def _reward_model_record(r: RewardModel) -> dict[str, Any]:
    return {
        "id": r.id,
        "parent": r.parent,
        "created_at": unix(r.created_at),
        "metrics": dict(r.metrics or {}),
        "path": r.path,
        "sha256": r.sha256,
    }
