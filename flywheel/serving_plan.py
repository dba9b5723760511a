"""Which versions a server serves: one decision, used at start-up, on every Redis message and on
every SQL poll.

SQL is the record of truth: every activation and canary is written there before it is announced
on Redis. So a server that can read SQL serves what SQL says, whatever Redis holds (a key Redis
kept through an outage cannot undo a rollback made meanwhile, and a version SQL does not know is
never served). Only while SQL cannot be read does the Redis announcement decide.
"""

from __future__ import annotations

import logging
from typing import Any

from feedback_store import Store
from feedback_store.errors import StoreError
from flywheel.checkpoints import Manifest, digest_of, verify_servable
from flywheel.hotswap import CanaryMessage, PolicyMessage, Publisher, ServingPlan
from flywheel.settings import Settings
from flywheel.versions import BASE_POLICY as BASE_POLICY  # re-exported: its older home

log = logging.getLogger(__name__)

Rows = tuple[dict[str, Any] | None, dict[str, Any] | None]  # (active, canary) rows of the store


def plan_from_rows(active: dict[str, Any], canary: dict[str, Any] | None) -> ServingPlan:
    """The plan SQL records (the active row must have stored files)."""
    on_canary = canary if canary is not None and canary.get("path") else None
    return ServingPlan(PolicyMessage.from_row(active),
                       None if on_canary is None else CanaryMessage.from_row(on_canary))


def decide(sql: Rows | None, announced: ServingPlan | None) -> ServingPlan | None:
    """The plan to serve, from SQL's rows (None: unreadable) and Redis's announcement (None:
    absent or unreadable); None means keep serving what is loaded."""
    if sql is None:
        return announced
    active, canary = sql
    if active is None or not active.get("path"):
        return None  # nothing recorded yet: a version SQL does not know is never served
    if announced is not None and announced.active.version != active["id"]:
        log.info("Redis announces %s, SQL records %s as active: following SQL",
                 announced.active.version, active["id"])
    return plan_from_rows(active, canary)


def check_servable(message: PolicyMessage, settings: Settings) -> Manifest:
    """What every server checks before loading a version, and what activation checks before
    recording one (raises ``CheckpointError``): see ``flywheel.checkpoints.verify_servable``."""
    root = settings.checkpoint_dir or settings.data_dir / "checkpoints"
    return verify_servable(message.path, version=message.version, sha256=message.sha256 or None,
                           root=root, base_model=settings.model)


def read_sql(store: Store) -> Rows | None:
    """(active, canary) rows, or None when the database cannot be read."""
    try:
        return store.serving_state()
    except StoreError as exc:
        log.debug("serving state not readable from SQL: %s", exc)
        return None


def record_base_policy(settings: Settings, store: Store) -> dict[str, Any]:
    """Record the base model as ``policy-0`` on first start; returns the active policy row."""
    active = store.active_policy()
    if active is not None:
        return active
    return store.ensure_base_policy(settings.model, digest_of(settings.model))


def announce(store: Store, publisher: Publisher) -> tuple[ServingPlan | None, bool]:
    """Publish what SQL now records (call after every change of the active version or canary);
    returns the plan and whether Redis took it."""
    active, canary = store.serving_state()
    if active is None or not active.get("path"):
        return None, False
    plan = plan_from_rows(active, canary)
    return plan, publisher.announce(plan)
