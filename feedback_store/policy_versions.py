"""Policy versions (the served checkpoints, one active) and reward model checkpoints."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.orm import Session

from feedback_store.base import StoreBase, unix, utcnow
from feedback_store.errors import InvalidInputError, NotFoundError
from feedback_store.models import POLICY_STATUSES, PolicyVersion, RewardModel

BASE_POLICY_ID = "policy-0"


class PoliciesMixin(StoreBase):
    """Policy and reward model bookkeeping for the worker, the server and operators."""

    def ensure_base_policy(self, path: str, sha256: str | None) -> dict[str, Any]:
        """Return the active policy; with none, make `policy-0` (the base model) active."""
        try:
            return self._ensure_base_policy(path, sha256)
        except exc.IntegrityError:  # another process inserted or activated it first
            return self._ensure_base_policy(path, sha256)

    def _ensure_base_policy(self, path: str, sha256: str | None) -> dict[str, Any]:
        with self._tx() as s:
            active = _active(s)
            if active is not None:
                return _policy_record(active)
            base = s.get(PolicyVersion, BASE_POLICY_ID)
            if base is None:
                base = PolicyVersion(
                    id=BASE_POLICY_ID,
                    parent=None,
                    path=path,
                    sha256=sha256,
                    status="active",
                    metrics={},
                    created_at=utcnow(),
                    activated_at=utcnow(),
                )
                s.add(base)
            else:
                base.status, base.activated_at = "active", utcnow()
            s.flush()
            return _policy_record(base)

    def list_policies(self) -> list[dict[str, Any]]:
        """All policy versions, newest first."""
        with self._tx(write=False) as s:
            return [_policy_record(p) for p in _newest_first(s.scalars(sa.select(PolicyVersion)))]

    def get_policy(self, id: str) -> dict[str, Any]:
        with self._tx(write=False) as s:
            return _policy_record(_get_policy(s, id))

    def active_policy(self) -> dict[str, Any] | None:
        with self._tx(write=False) as s:
            active = _active(s)
            return None if active is None else _policy_record(active)

    def next_policy_id(self) -> str:
        """`policy-N` with N one past the highest stored (policy-0 is the base model)."""
        with self._tx(write=False) as s:
            return f"policy-{_max_number(s.scalars(sa.select(PolicyVersion.id))) + 1}"

    def add_policy(
        self,
        *,
        id: str,
        parent: str | None,
        path: str | None,
        sha256: str | None,
        status: str = "candidate",
        metrics: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record a new policy checkpoint; status "active" also retires the active one."""
        _check_status(status)
        try:
            with self._tx() as s:
                row = PolicyVersion(
                    id=id,
                    parent=parent,
                    path=path,
                    sha256=sha256,
                    status="candidate" if status == "active" else status,
                    metrics=dict(metrics or {}),
                    created_at=utcnow(),
                    activated_at=None,
                )
                s.add(row)
                s.flush()
                if status == "active":
                    _activate(s, id, force=True)
                return _policy_record(row)
        except exc.IntegrityError as error:
            raise InvalidInputError(
                f"Policy '{id}' already exists", param="id", code="policy_exists"
            ) from error

    def activate_policy(self, id: str, *, force: bool = False,
                        metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """Make this version the served one and retire the old one (rollback and roll-forward).

        Promoting the canary ends it; activating another version aborts a running canary, whose
        evidence compared it with a version no longer served. `metrics` are merged in.
        """
        with self._tx() as s:
            row = _activate(s, id, force=force)
            if metrics:
                row.metrics = {**row.metrics, **metrics}
            return _policy_record(row)

    def set_policy_status(
        self, id: str, status: str, metrics: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Change a version's status (metrics are merged in); "active" means activate_policy."""
        _check_status(status)
        with self._tx() as s:
            if status == "active":
                row = _activate(s, id, force=True)
            else:
                row = _get_policy(s, id)
                if row.status == "active":
                    raise InvalidInputError(
                        f"Policy '{id}' is active; activate another version instead",
                        param="status",
                        code="policy_active",
                    )
                row.status = status
            if metrics:
                row.metrics = {**row.metrics, **metrics}
            s.flush()
            return _policy_record(row)

    def prunable_policies(self, keep: int, protect: set[str] | None = None
                          ) -> list[dict[str, Any]]:
        """Versions whose files may be deleted: not active, not on canary, not policy-0, not the
        newest `keep`, not in `protect` (the best version by live approval)."""
        with self._tx(write=False) as s:
            rows = _newest_first(s.scalars(sa.select(PolicyVersion)))
        protected = {p.id for p in rows[: max(keep, 0)]} | {BASE_POLICY_ID} | (protect or set())
        return [
            _policy_record(p)
            for p in rows
            if p.id not in protected and p.status not in ("active", "canary")
            and p.path is not None
        ]

    def mark_policy_pruned(self, id: str) -> dict[str, Any]:
        """Forget the path of a version whose files were deleted, so it is not pruned twice."""
        with self._tx() as s:
            row = _get_policy(s, id)
            if row.status in ("active", "canary"):
                raise InvalidInputError(
                    f"Policy '{id}' is {row.status}", param="id", code="policy_serving"
                )
            row.path = None
            s.flush()
            return _policy_record(row)

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
    ) -> dict[str, Any]:
        try:
            with self._tx() as s:
                row = RewardModel(
                    id=id,
                    parent=parent,
                    path=path,
                    sha256=sha256,
                    metrics=dict(metrics or {}),
                    created_at=utcnow(),
                )
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


def _activate(s: Session, id: str, *, force: bool) -> PolicyVersion:
    # Lock every version row, so two concurrent activations run one after the other (the
    # table is small). SQLite ignores FOR UPDATE; its BEGIN IMMEDIATE serializes already.
    # Locked in id order, so two concurrent writers take their locks in the same order and queue
    # instead of deadlocking.
    rows = {p.id: p for p in s.scalars(
        sa.select(PolicyVersion).order_by(PolicyVersion.id).with_for_update())}
    target = rows.get(id)
    if target is None:
        raise NotFoundError(f"No policy version '{id}'", code="policy_not_found")
    _check_servable(target, force=force)
    if target.status == "active":
        return target
    for row in rows.values():
        if row.status == "active":
            row.status = "retired"
        elif row.status == "canary" and row.id != id:
            row.status = "candidate"  # its evidence compared it with a version no longer served
            row.metrics = {**row.metrics, "canary/decision": "aborted",
                           "canary/reason": f"{id} was activated"}
    s.flush()  # retire first: the partial unique index allows one active row at any moment
    target.status, target.activated_at = "active", utcnow()
    s.flush()
    return target


def _check_servable(target: PolicyVersion, *, force: bool) -> None:
    if target.status == "rejected" and not force:
        raise InvalidInputError(
            f"Policy '{target.id}' was rejected; force to serve it anyway",
            param="id",
            code="policy_rejected",
        )
    if target.path is None:
        raise InvalidInputError(
            f"Policy '{target.id}' has no stored files", param="id", code="policy_pruned"
        )


def _active(s: Session) -> PolicyVersion | None:
    return s.scalar(sa.select(PolicyVersion).where(PolicyVersion.status == "active"))


def _get_policy(s: Session, id: str) -> PolicyVersion:
    row = s.get(PolicyVersion, id)
    if row is None:
        raise NotFoundError(f"No policy version '{id}'", code="policy_not_found")
    return row


def _check_status(status: str) -> None:
    if status not in POLICY_STATUSES:
        raise InvalidInputError(
            f"status must be one of {', '.join(POLICY_STATUSES)}", param="status"
        )


def _number(id: str) -> int:
    """N of "policy-N" / "rm-N"; -1 for ids not in that form."""
    tail = id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _max_number(ids: Any) -> int:
    return max((_number(i) for i in ids), default=-1)


def _newest_first(rows: Any) -> list[Any]:
    return sorted(rows, key=lambda r: (r.created_at, _number(r.id)), reverse=True)


def _policy_record(p: PolicyVersion) -> dict[str, Any]:
    return {
        "id": p.id,
        "parent": p.parent,
        "created_at": unix(p.created_at),
        "status": p.status,
        "metrics": dict(p.metrics or {}),
        "path": p.path,
        "sha256": p.sha256,
        "activated_at": unix(p.activated_at),
        "canary": None if p.status != "canary" else {
            "fraction": p.canary_fraction,
            "started_at": unix(p.canary_started_at),
        },
    }


def _reward_model_record(r: RewardModel) -> dict[str, Any]:
    return {
        "id": r.id,
        "parent": r.parent,
        "created_at": unix(r.created_at),
        "metrics": dict(r.metrics or {}),
        "path": r.path,
        "sha256": r.sha256,
    }
