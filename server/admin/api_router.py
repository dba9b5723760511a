"""Routes to inspect and steer the policy versions (activation, canary) and the trainer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Body, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from feedback_store.types import IMPLICIT_SIGNALS
from flywheel.checkpoints import CheckpointError
from flywheel.live_approval import Pooled, best_version, forgotten, live_record
from flywheel.serving_plan import PolicyMessage, announce, check_servable
from server.errors import APIError
from server.state import AppState, require_admin, require_user

router = APIRouter()

_PUBLIC_POLICY_FIELDS = ("id", "parent", "created_at", "status", "metrics", "canary", "reason")


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    force: bool = False


class CanaryRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    fraction: float | None = Field(default=None, gt=0.0, lt=1.0)  # default: canary.fraction
    force: bool = False  # canary a version that was rejected before
    # "request" (each rater sees both arms), "user" (sticky per rater), "auto" (by the raters
    # of the newest thumbs); default: canary.unit
    unit: Literal["auto", "request", "user"] | None = None


def _policy(row: dict, ratings: dict[str, tuple[int, int]], pooled: Pooled,
            implicit: dict[str, dict[str, int]]) -> dict:
    body = {k: row.get(k) for k in _PUBLIC_POLICY_FIELDS}
    body["object"] = "policy"
    body["live"] = live_record(*ratings.get(row["id"], (0, 0)), pooled.get(row["id"]))
    body["implicit"] = implicit.get(row["id"], dict.fromkeys(IMPLICIT_SIGNALS, 0))
    return body


def _policies_view(state: AppState) -> dict[str, Any]:
    rows = state.store.list_policies()
    ratings, pooled = state.store.live_ratings(), state.store.pooled_live()
    implicit = state.store.implicit_counts()
    cfg = state.settings.canary
    return {
        "object": "list",
        "data": [_policy(r, ratings, pooled, implicit) for r in rows],
        "served": state.engine.policy_version,
        "canary": state.split.version,
        "best": best_version(rows, ratings, cfg.min_rollback_ratings, pooled),
        "regression": forgotten(rows, ratings, cfg, pooled),
        "replicas": state.publisher.replicas(),
    }


async def _announce(state: AppState) -> bool:
    """Publish what SQL now records, and apply it here before answering."""
    plan, published = await to_thread.run_sync(announce, state.store, state.publisher)
    if plan is not None and state.watcher is not None:
        await state.watcher.apply(plan)
    return published


async def _check_files(state: AppState, policy_id: str, *, force: bool) -> None:
    """Refuse (409, nothing recorded) a version whose files every server would refuse."""
    row = await to_thread.run_sync(lambda: state.store.get_policy(policy_id))
    if row.get("path") is None or (row["status"] == "rejected" and not force):
        return  # the store refuses it with its own error, before any hashing
    try:
        await to_thread.run_sync(check_servable, PolicyMessage.from_row(row), state.settings)
    except CheckpointError as exc:
        raise APIError(409, f"Policy '{policy_id}' cannot be served: {exc}", param="id",
                       code="checkpoint_invalid") from exc


def _one_view(state: AppState, policy_id: str) -> dict:
    row = state.store.get_policy(policy_id)
    return _policy(row, state.store.live_ratings(), state.store.pooled_live(),
                   state.store.implicit_counts())


async def _one(state: AppState, policy_id: str, published: bool) -> dict:
    return {**await to_thread.run_sync(_one_view, state, policy_id), "published": published}


@router.get("/v1/policies")
async def list_policies(state: Annotated[AppState, Depends(require_user)]) -> dict:
    """Every version newest first, with its live approval; `best` is the stored version with
    the highest lower bound of approval, `regression` names a stored version users rate
    significantly better than the active one (null while the active holds its own), and
    `replicas` what each server reported serving in the last half minute."""
    return await to_thread.run_sync(_policies_view, state)


@router.get("/v1/policies/{policy_id}")
async def get_policy(policy_id: str, state: Annotated[AppState, Depends(require_user)]) -> dict:
    return await to_thread.run_sync(_one_view, state, policy_id)


@router.post("/v1/policies/{policy_id}/activate")
async def activate_policy(
    policy_id: str,
    state: Annotated[AppState, Depends(require_admin)],
    force: Annotated[bool, Query()] = False,
    body: Annotated[ActivateRequest | None, Body()] = None,
) -> dict:
    """Make a stored version the served one on every replica: rollback, roll-forward, and
    promotion of the canary."""
    force = force or bool(body and body.force)
    await _check_files(state, policy_id, force=force)
    await to_thread.run_sync(lambda: state.store.activate_policy(policy_id, force=force))
    return await _one(state, policy_id, await _announce(state))


@router.post("/v1/policies/{policy_id}/canary", status_code=201)
async def start_canary(
    policy_id: str,
    state: Annotated[AppState, Depends(require_admin)],
    body: Annotated[CanaryRequest | None, Body()] = None,
) -> dict:
    """Serve a stored version to a share of new requests on every replica; 409 while another
    canary runs."""
    request = body or CanaryRequest()
    fraction = request.fraction if request.fraction is not None else \
        state.settings.canary.fraction
    await _check_files(state, policy_id, force=request.force)
    await to_thread.run_sync(
        lambda: state.store.start_canary(
            policy_id, fraction, force=request.force,
            unit=state.store.canary_unit(request.unit or state.settings.canary.unit,
                                         state.settings.canary.sticky_raters)))
    return await _one(state, policy_id, await _announce(state))


@router.delete("/v1/policies/{policy_id}/canary")
async def abort_canary(policy_id: str, state: Annotated[AppState, Depends(require_admin)]
                       ) -> dict:
    """End the canary of this version without promotion (it returns to `candidate`)."""
    await to_thread.run_sync(lambda: state.store.end_canary(
        "candidate", {"canary/decision": "aborted", "canary/reason": "ended by an operator"},
        id=policy_id))
    return await _one(state, policy_id, await _announce(state))


@router.get("/v1/training/runs")
async def list_runs(state: Annotated[AppState, Depends(require_admin)],
                    limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict:
    rows = await to_thread.run_sync(lambda: state.store.list_training_runs(limit=limit))
    return {"object": "list", "data": rows}


@router.get("/v1/training/runs/{run_id}")
async def get_run(run_id: int, state: Annotated[AppState, Depends(require_admin)]) -> dict:
    return await to_thread.run_sync(lambda: state.store.get_training_run(run_id))


@router.post("/v1/training/runs", status_code=201)
async def start_run(state: Annotated[AppState, Depends(require_admin)]) -> dict:
    """Queue a training cycle now; the leading worker picks it up on its next poll of SQL."""
    return await to_thread.run_sync(lambda: state.store.create_training_run(trigger="manual"))
