"""Training runs: a queue in SQL that any number of workers claim from safely."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.orm import Session

from feedback_store.base import StoreBase, unix, utcnow
from feedback_store.errors import InvalidInputError, NotFoundError
from feedback_store.models import RUN_FINISHED, RUN_STATUSES, RUN_TRIGGERS, TrainingRun
from feedback_store.types import Marks

MAX_RUN_ID = 2**31 - 1  # an INTEGER key: a larger id names no run (PostgreSQL refuses to compare)


class RunsMixin(StoreBase):
    """Create, claim, update and list training runs."""

    def create_training_run(self, *, trigger: str) -> dict[str, Any]:
        """Queue a run; `trigger` is "feedback" (enough new feedback) or "manual"."""
        if trigger not in RUN_TRIGGERS:
            raise InvalidInputError(
                f"trigger must be one of {', '.join(RUN_TRIGGERS)}", param="trigger"
            )
        with self._tx() as s:
            row = TrainingRun(status="queued", trigger=trigger, created_at=utcnow(), metrics={})
            s.add(row)
            s.flush()
            return run_record(row)

    def claim_next_run(self, worker_id: str) -> dict[str, Any] | None:
        """Move the oldest queued run to running for this worker; None when the queue is empty."""
        # PostgreSQL skips rows another worker has locked (FOR UPDATE SKIP LOCKED); SQLite
        # ignores the clause and serializes writers with BEGIN IMMEDIATE. The UPDATE is guarded
        # by status either way, so a run is never claimed twice.
        with self._tx() as s:
            while True:
                run_id = s.scalar(
                    sa.select(TrainingRun.id)
                    .where(TrainingRun.status == "queued")
                    .order_by(TrainingRun.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                if run_id is None:
                    return None
                claimed = s.execute(
                    sa.update(TrainingRun)
                    .where(TrainingRun.id == run_id, TrainingRun.status == "queued")
                    .values(status="running", worker_id=worker_id, started_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
                if claimed.rowcount == 1:  # type: ignore[attr-defined]
                    return run_record(s.get_one(TrainingRun, run_id, populate_existing=True))

    def update_training_run(
        self,
        id: int,
        *,
        status: str | None = None,
        metrics: dict[str, Any] | None = None,
        error: str | None = None,
        policy_id: str | None = None,
        reward_model_id: str | None = None,
        watermark: Marks | None = None,
    ) -> dict[str, Any]:
        """Change the given fields; metrics are merged in, a finished status stamps finished_at."""
        if status is not None and status not in RUN_STATUSES:
            raise InvalidInputError(
                f"status must be one of {', '.join(RUN_STATUSES)}", param="status"
            )
        try:
            with self._tx() as s:
                row = _get_run(s, id)
                if status is not None:
                    _set_status(row, status)
                if metrics:
                    row.metrics = {**(row.metrics or {}), **metrics}
                if error is not None:
                    row.error = error
                if policy_id is not None:
                    row.policy_id = policy_id
                if reward_model_id is not None:
                    row.reward_model_id = reward_model_id
                if watermark is not None:
                    row.watermark = watermark
                s.flush()
                return run_record(row)
        except exc.IntegrityError as err:
            raise NotFoundError(
                "policy_id or reward_model_id names no stored checkpoint",
                param="policy_id" if policy_id is not None else "reward_model_id",
            ) from err

    def get_training_run(self, id: int) -> dict[str, Any]:
        with self._tx(write=False) as s:
            return run_record(_get_run(s, id))

    def list_training_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest runs first."""
        with self._tx(write=False) as s:
            rows = s.scalars(sa.select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit))
            return [run_record(r) for r in rows]

    def fail_stale_runs(self, reason: str) -> int:
        """Mark every running run failed (a worker starting up owns none); returns how many."""
        with self._tx() as s:
            result = s.execute(
                sa.update(TrainingRun)
                .where(TrainingRun.status == "running")
                .values(status="failed", error=reason, finished_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    def has_open_run(self) -> bool:
        """Whether a run is queued or running."""
        with self._tx(write=False) as s:
            open_id = s.scalar(
                sa.select(TrainingRun.id)
                .where(TrainingRun.status.in_(("queued", "running")))
                .limit(1)
            )
            return open_id is not None


def _set_status(row: TrainingRun, status: str) -> None:
    row.status = status
    if status == "running" and row.started_at is None:
        row.started_at = utcnow()
    if status in RUN_FINISHED and row.finished_at is None:
        row.finished_at = utcnow()


def _get_run(s: Session, id: int) -> TrainingRun:
    row = s.get(TrainingRun, id) if 0 < id <= MAX_RUN_ID else None
    if row is None:
        raise NotFoundError(f"No training run {id}", param="id", code="run_not_found")
    return row


def run_record(r: TrainingRun) -> dict[str, Any]:
    return {
        "id": r.id,
        "object": "training.run",
        "status": r.status,
        "trigger": r.trigger,
        "created_at": unix(r.created_at),
        "started_at": unix(r.started_at),
        "finished_at": unix(r.finished_at),
        "policy_id": r.policy_id,
        "reward_model_id": r.reward_model_id,
        "metrics": dict(r.metrics or {}),
        "error": r.error,
        "reason": _reason(r),
    }


def _reason(r: TrainingRun) -> str | None:
    """What a run that did not produce a candidate waited for or stopped on, in users' terms."""
    if r.status == "skipped":
        return str((r.metrics or {}).get("cycle/skip_reason") or "skipped")
    if r.status in ("failed", "cancelled"):
        return r.error
    if r.status == "rejected":
        reasons = (r.metrics or {}).get("gate/reasons")
        return "; ".join(map(str, reasons)) if isinstance(reasons, list) and reasons else None
    if r.status == "queued":
        return "queued: waiting for the trainer worker"
    return None
