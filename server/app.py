"""The FastAPI application: lifespan (DB, policy, engine, watcher), routers, error handlers."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from feedback_store import Store
from feedback_store.errors import StoreUnavailableError
from flywheel.serving_plan import Publisher, initial_plan
from flywheel.settings import Settings
from server.admin.api_router import router as admin_router
from server.admin.history import router as history_router
from server.admin.identities import router as identities_router
from server.auth import Authenticator, exposed
from server.browser_guard import BrowserGuard
from server.canary_split import CanarySplit
from server.chat.api_router import router as chat_router
from server.completions.api_router import router as completions_router
from server.completions.recording import completion_writes
from server.console.api_router import router as console_router
from server.engines.base import Engine
from server.errors import install_error_handlers
from server.feedback.api_router import router as feedback_router
from server.feedback.recording import feedback_writes
from server.health import router as health_router
from server.hotswap import PolicyWatcher
from server.limits import BodyLimit
from server.metrics import ServerMetrics
from server.openapi import install_openapi
from server.shares import KeyShares
from server.state import AppState
from server.watchdog import LoopWatchdog

log = logging.getLogger(__name__)

DB_WAIT_SECONDS = 60.0


def wait_for_database(store: Store, timeout: float = DB_WAIT_SECONDS) -> None:
    """Start-up waits for the database (compose starts everything at once)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            store.ping()
            return
        except StoreUnavailableError:
            if time.monotonic() > deadline:
                raise
            log.info("waiting for the database ...")
            time.sleep(1.0)


def create_app(settings: Settings, *, engine: Engine | None = None,
               store: Store | None = None, watch: bool = True) -> FastAPI:
    """Build the app; ``engine``/``store`` may be injected (tests), else built from settings."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = store or Store(settings.database_url)
        await to_thread.run_sync(wait_for_database, db)
        await to_thread.run_sync(db.upgrade)
        metrics = ServerMetrics()
        metrics.watch_live_approval(db.live_ratings)
        publisher = Publisher.from_url(settings.redis_url, settings.redis_namespace)
        eng = engine
        if eng is None:
            from server.engines import create_engine

            plan = await to_thread.run_sync(initial_plan, settings, db, publisher)
            eng = create_engine(settings, model_path=plan.active.path,
                                policy_version=plan.active.version,
                                sha256=plan.active.sha256 or None)
        await eng.start()
        metrics.set_policy(eng.policy_version)
        split = CanarySplit()
        state = AppState(settings=settings, engine=eng, store=db, metrics=metrics,
                         auth=Authenticator(settings), split=split, publisher=publisher,
                         completion_writes=completion_writes(db),
                         feedback_writes=feedback_writes(db),
                         shares=KeyShares(settings.max_waiting_requests,
                                          settings.max_waiting_per_key, settings.fair_share))
        if watch:
            state.watcher = PolicyWatcher(settings, eng, db, metrics, split)
            await state.watcher.start()
        app.state.flywheel = state
        watchdog = None
        if settings.watchdog_seconds > 0:
            watchdog = LoopWatchdog(asyncio.get_running_loop(), settings.watchdog_seconds)
            watchdog.start()
        # Start-up leaves ~140k long-lived objects (torch, transformers, the app); full GC passes
        # over them took 100-170 ms about once a second under load, the p99 tail of every route.
        gc.collect()
        gc.freeze()
        log.info("serving %s (%s) on %s", settings.served_model_name, eng.policy_version,
                 settings.engine)
        try:
            yield
        finally:
            if watchdog is not None:
                watchdog.stop()
            if state.watcher is not None:
                await state.watcher.stop()
            await eng.stop()
            await to_thread.run_sync(state.completion_writes.close)
            await to_thread.run_sync(state.feedback_writes.close)
            publisher.close()
            if store is None:
                db.close()

    # Closed docs are absent (404), not behind the admin key: a browser cannot send a bearer
    # key to /docs. Open without keys unless FLYWHEEL_EXPOSE_DOCS=false, closed with keys unless
    # it is true (server/auth.py `exposed`; /metrics likewise in server/health.py).
    docs = exposed(settings.expose_docs, settings)
    app = FastAPI(title="Flywheel", version="0.1.0", lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    install_error_handlers(app)
    for router in (completions_router, feedback_router, admin_router, history_router,
                   health_router, console_router, chat_router, identities_router):
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes,
                       timeout_s=settings.body_timeout_s)
    app.add_middleware(BrowserGuard.for_settings, settings=settings)  # outermost: first to look
    install_openapi(app, settings)
    _count_requests(app)
    return app


def _count_requests(app: FastAPI) -> None:
    # A plain ASGI wrapper: BaseHTTPMiddleware would copy every streamed chunk through a queue.
    inner = app.build_middleware_stack

    def build() -> ASGIApp:
        wrapped = inner()

        async def counting(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await wrapped(scope, receive, send)
                return
            status = {"code": 500}

            async def send_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            try:
                await wrapped(scope, receive, send_status)
            finally:
                state = getattr(app.state, "flywheel", None)
                if state is not None:
                    path = getattr(scope.get("route"), "path", "unmatched")
                    state.metrics.requests.labels(path, str(status["code"])).inc()

        return counting

    app.build_middleware_stack = build  # type: ignore[method-assign]
