"""Policy versions: the served checkpoints, one active.

Every change of a version's state the worker makes on its own (promote, reject, time out, roll
back, release) is conditional: it applies only while the state it was decided on still holds, and
otherwise writes nothing and says so (``Transition``), so a race with an operator or another
worker ends nothing. Operators' calls (``activate_policy``, ``start_canary``, ``end_canary``)
raise as before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.orm import Session

from feedback_store.base import StoreBase, unix, utcnow
from feedback_store.errors import InvalidInputError, NotFoundError
from feedback_store.models import POLICY_STATUSES, Feedback, PolicyVersion
from flywheel.rater_pooling import CANARY_UNITS
from flywheel.versions import BASE_POLICY

BASE_POLICY_ID = BASE_POLICY  # the older name, kept for callers outside the store
# In a candidate's metrics while it waits for the running canary to end (unix time it began to
# wait), beside its `waiting_since`; both cleared when it leaves `candidate`. Only candidates
# waiting are released by the judge.
WAITING = "release/waiting_since"


@dataclass(frozen=True)
class Transition:
    """What a conditional change of a version's state did.

    `applied` is False when the state it was decided on no longer held (someone changed it
    first): nothing was written and `reason` says what was found instead. `outcome` is the
    version's new state ("active", "rejected", "candidate", "canary", "waiting", "retired"), empty
    when nothing applied; `retired` names waiting candidates retired on the way.
    """

    applied: bool
    outcome: str = ""
    record: dict[str, Any] | None = None
    reason: str = ""
    retired: tuple[str, ...] = ()


class PoliciesMixin(StoreBase):
    """Policy bookkeeping for the worker, the server and operators."""

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
            base = s.get(PolicyVersion, BASE_POLICY)
            if base is None:
                base = PolicyVersion(
                    id=BASE_POLICY,
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

    def latest_kl_coef(self) -> float | None:
        """The coefficient the newest version's adaptive KL controller ended PPO with: the
        controller's state, carried from cycle to cycle. None while no version has one."""
        with self._tx(write=False) as s:
            rows = _newest_first(s.scalars(
                sa.select(PolicyVersion).where(PolicyVersion.kl_coef.is_not(None))))
            return rows[0].kl_coef if rows else None

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
        kl_coef: float | None = None,
    ) -> dict[str, Any]:
        """Record a new policy checkpoint; status "active" also retires the active one.
        `kl_coef`: the one its adaptive KL controller ended PPO with (None: a fixed one)."""
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
                    kl_coef=kl_coef,
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

    def activate_if(self, id: str, *, active: str | None, canary: str | None,
                    status: str | None = None, force: bool = False,
                    metrics: dict[str, Any] | None = None) -> Transition:
        """`activate_policy`, applied only while `active` is the active version, `canary` the
        one on canary (None: none runs) and, when given, `status` the version's own: promotion
        (canary=id), rollback (canary=None) and release without a canary. Otherwise nothing is
        written and the Transition says why."""
        with self._tx() as s:
            rows = _lock_all(s)
            target = rows.get(id)
            problem = _differs(rows, active=active, canary=canary)
            if target is None:
                problem = f"no policy version '{id}'"
            elif problem is None and status is not None and target.status != status:
                problem = f"{id} is {target.status}, not {status}"
            elif problem is None and target.status == "active":
                problem = f"{id} is active already"
            elif problem is None:
                problem = _unservable(target, force=force)
            if problem is not None:
                return Transition(False, record=_record_of(target), reason=problem)
            row = _activate(s, id, force=force)
            if metrics:
                row.metrics = {**row.metrics, **metrics}
            return Transition(True, "active", _policy_record(row))

    def end_canary_if(self, id: str, status: str, metrics: dict[str, Any] | None = None, *,
                      active: str | None) -> Transition:
        """End version `id`'s canary with `status` ("rejected", or "candidate" when out of
        time), applied only while `id` is still on canary against `active`."""
        if status not in ("rejected", "candidate", "retired"):
            raise InvalidInputError("a canary ends as rejected, candidate or retired",
                                    param="status")
        with self._tx() as s:
            rows = _lock_all(s)
            problem = _differs(rows, active=active, canary=id)
            row = rows.get(id)
            if problem is not None or row is None:
                return Transition(False, record=_record_of(row),
                                  reason=problem or f"no policy version '{id}'")
            _leave_candidacy(row)
            row.status = status
            if metrics:
                row.metrics = {**row.metrics, **metrics}
            s.flush()
            return Transition(True, status, _policy_record(row))

    def release_candidate(self, id: str, fraction: float, unit: str = "user",
                          sticky_raters: int = 200) -> Transition:
        """Release candidate `id` (it passed the offline gate) to a canary of `fraction`,
        assigned per `unit` ("request", "user", or "auto": see `canary_unit`).

        While a canary runs it waits instead (outcome "waiting", `waiting_since` set). With
        none running, the newest waiting candidate starts its canary (this one, normally) and
        every older waiting one is retired (outcome "retired" if a newer one went first). Not
        applied when `id` is no longer a candidate (an operator retired or served it)."""
        unit = self.canary_unit(unit, sticky_raters)  # type: ignore[attr-defined]
        with self._tx() as s:
            rows = _lock_all(s)
            target = rows.get(id)
            if target is None or target.status != "candidate":
                return Transition(False, record=_record_of(target),
                                  reason=f"{id} is not a candidate" if target is None else
                                  f"{id} is {target.status}, not a candidate")
            now = time.time()
            target.metrics = {**target.metrics, WAITING: now}
            target.waiting_since = datetime.fromtimestamp(now, timezone.utc)
            _, running = _serving(rows)
            if running is not None:
                s.flush()
                return Transition(True, "waiting", _policy_record(target),
                                  f"{running.id} is on canary")
            started, retired = _release_newest_waiting(s, rows, fraction, unit)
            return Transition(True, "canary" if started is target else "retired",
                              _policy_record(target),
                              "" if started is target else
                              f"{started.id if started else 'nothing'} went on canary instead",
                              retired)

    def candidate_waits(self) -> bool:
        """Whether a candidate waits for the running canary to end (released during it)."""
        with self._tx(write=False) as s:
            return s.scalar(sa.select(PolicyVersion.id).where(
                PolicyVersion.status == "candidate", PolicyVersion.waiting_since.is_not(None))
                .limit(1)) is not None

    def release_waiting(self, fraction: float, unit: str = "user",
                        sticky_raters: int = 200) -> Transition | None:
        """With no canary running, put the newest waiting candidate on canary and retire the
        older waiting ones (each with `release/retired` saying why); None when nothing waits or
        a canary runs. Cheap when nothing waits: one read, no write lock."""
        if not self.candidate_waits():
            return None
        unit = self.canary_unit(unit, sticky_raters)  # type: ignore[attr-defined]
        with self._tx() as s:
            rows = _lock_all(s)
            if _serving(rows)[1] is not None:
                return None
            started, retired = _release_newest_waiting(s, rows, fraction, unit)
            if started is None and not retired:
                return None
            return Transition(started is not None, "canary" if started else "",
                              _record_of(started), "" if started else "no waiting candidate "
                              "has stored files", retired)

    def prunable_policies(self, keep: int, protect: set[str] | None = None
                          ) -> list[dict[str, Any]]:
        """Versions whose files may be deleted: not active, not on canary, not policy-0, not the
        newest `keep`, not in `protect` (the best version by live approval)."""
        with self._tx(write=False) as s:
            rows = _newest_first(s.scalars(sa.select(PolicyVersion)))
        protected = {p.id for p in rows[: max(keep, 0)]} | {BASE_POLICY} | (protect or set())
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
    _leave_candidacy(target)
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


def _lock_all(s: Session) -> dict[str, PolicyVersion]:
    """Every version row, locked in id order as every activation locks them (two writers queue
    instead of deadlocking; SQLite's BEGIN IMMEDIATE serializes writers already)."""
    return {p.id: p for p in s.scalars(
        sa.select(PolicyVersion).order_by(PolicyVersion.id).with_for_update())}


def _serving(rows: dict[str, PolicyVersion]) -> tuple[PolicyVersion | None, PolicyVersion | None]:
    active = next((r for r in rows.values() if r.status == "active"), None)
    canary = next((r for r in rows.values() if r.status == "canary"), None)
    return active, canary


def _differs(rows: dict[str, PolicyVersion], *, active: str | None, canary: str | None
             ) -> str | None:
    """What differs from the serving state a decision was taken on (None: it still holds)."""
    now_active, now_canary = (None if r is None else r.id for r in _serving(rows))
    if now_active != active:
        return f"{now_active or 'no version'} is active, not {active or 'none'}"
    if now_canary != canary:
        if canary is None:
            return f"{now_canary} is on canary now"
        row = rows.get(canary)
        found = f"{canary} is {row.status}" if row is not None else f"no policy version '{canary}'"
        return f"{found} and {now_canary or 'no version'} is on canary"
    return None


def _begin_canary(s: Session, target: PolicyVersion, fraction: float, unit: str) -> None:
    """Put `target` on canary, assigned per `unit`: its live evidence counts feedback stored
    from now on, on answers produced from now on."""
    if unit not in CANARY_UNITS:
        raise InvalidInputError(f"a canary's unit is one of {', '.join(CANARY_UNITS)}",
                                param="unit", code="invalid_unit")
    _leave_candidacy(target)
    target.status = "canary"
    target.canary_fraction = float(fraction)
    target.canary_unit = unit
    target.canary_started_at = utcnow()
    target.canary_feedback_after = s.scalar(sa.select(sa.func.max(Feedback.id))) or 0


def _leave_candidacy(row: PolicyVersion) -> None:
    """A version leaving `candidate` waits no more."""
    row.waiting_since = None
    if WAITING in (row.metrics or {}):
        row.metrics = {k: v for k, v in row.metrics.items() if k != WAITING}


def _release_newest_waiting(s: Session, rows: dict[str, PolicyVersion], fraction: float,
                            unit: str) -> tuple[PolicyVersion | None, list[str]]:
    """The newest waiting candidate with stored files goes on canary; the other waiting ones are
    retired. Call with the rows locked and no canary running."""
    waiting = [r for r in _newest_first(rows.values())
               if r.status == "candidate" and r.waiting_since is not None]
    started = next((r for r in waiting if r.path is not None), None)
    retired = []
    for row in waiting:
        if row is started:
            continue
        why = (f"superseded by {started.id}, a newer candidate, which went on canary"
               if started is not None else "its files were pruned while it waited")
        _leave_candidacy(row)
        row.status = "retired"
        row.metrics = {**row.metrics, "release/retired": why}
        retired.append(row.id)
    if started is not None:
        since = started.waiting_since
        waited = time.time() - since.timestamp() if since is not None else 0.0
        _begin_canary(s, started, fraction, unit)
        started.metrics = {**started.metrics, "release/waited_seconds": round(waited, 3)}
    s.flush()
    return started, retired


def _record_of(row: PolicyVersion | None) -> dict[str, Any] | None:
    return None if row is None else _policy_record(row)


def _unservable(target: PolicyVersion, *, force: bool) -> str | None:
    """Why `_check_servable` would refuse `target` (None: it would not)."""
    if target.status == "rejected" and not force:
        return f"{target.id} was rejected"
    if target.path is None:
        return f"{target.id} has no stored files"
    return None


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
            "unit": p.canary_unit or "user",
        },
        "reason": _waiting_reason(p),
    }


def _waiting_reason(p: PolicyVersion) -> str | None:
    """What a canary or a waiting candidate waits for, in users' terms (None: it waits for
    nothing)."""
    metrics = p.metrics or {}
    if p.status == "canary":
        return str(metrics.get("canary/reason") or "canary: waiting for its first thumbs")
    if p.status == "candidate" and p.waiting_since is not None:
        return ("passed the offline gate; waits for the running canary to end (the newest "
                "waiting candidate goes on canary next, older ones are retired)")
    return None
