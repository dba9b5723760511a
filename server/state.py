"""What every route needs, built once in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from feedback_store import Store
from flywheel.serving_plan import Publisher
from flywheel.settings import Settings
from server.auth import Authenticator
from server.canary_split import CanarySplit
from server.completions.recording import CompletionWrites
from server.engines.base import Engine
from server.feedback.recording import FeedbackWrites
from server.metrics import ServerMetrics
from server.shares import KeyShares

if TYPE_CHECKING:
    from server.hotswap import PolicyWatcher


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    store: Store
    metrics: ServerMetrics
    auth: Authenticator
    split: CanarySplit
    publisher: Publisher
    completion_writes: CompletionWrites
    feedback_writes: FeedbackWrites
    shares: KeyShares
    watcher: PolicyWatcher | None = None


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.flywheel
    return state


async def require_user(request: Request) -> AppState:
    """Dependency of /v1 routes: checks the bearer key, returns the app state. Async: FastAPI runs
    a plain `def` dependency on a worker thread, a hop that cost the feedback route about a tenth
    of its CPU."""
    state = get_state(request)
    state.auth.check_user(request)
    return state


async def require_admin(request: Request) -> AppState:
    state = get_state(request)
    state.auth.check_admin(request)
    return state
