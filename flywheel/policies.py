"""Policy bookkeeping shared by the server and the worker."""

from __future__ import annotations

from feedback_store import Store
from flywheel.checkpoints import digest_of
from flywheel.settings import Settings

BASE_POLICY = "policy-0"


def record_base_policy(settings: Settings, store: Store) -> dict:
    """Record the base model as ``policy-0`` on first start; returns the active policy row."""
    active = store.active_policy()
    if active is not None:
        return active
    return store.ensure_base_policy(settings.model, digest_of(settings.model))
