"""Server fixtures: the app on a fake engine (fast), and a live `flywheel serve` on a real model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from feedback_store import Store
from flywheel.settings import Settings
from server.app import create_app
from server.engines.base import Engine
from server.engines.fake import FakeEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(tmp_path: Path, db_url: str, **overrides: object) -> Settings:
    return Settings(data_dir=tmp_path, database_url=db_url, model=str(tmp_path / "no-model"),
                    **overrides)  # type: ignore[arg-type]


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(tmp_path: Path, db_url: str, store: Store, fake_engine: FakeEngine
           ) -> Iterator[TestClient]:
    """The app on the fake engine and `store` (tests/conftest.py: migrated once per session; the
    app's start-up upgrade is the one Alembic run of the test, and finds nothing to do)."""
    settings = make_settings(tmp_path, db_url)
    app = create_app(settings, engine=fake_engine, store=store, watch=False)
    with TestClient(app) as c:
        yield c


class ThreadServer:
    """uvicorn in a background thread of this process: a real socket, real concurrency."""

    def __init__(self, app, port: int) -> None:
        self.port = port
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def spawn_server(env_overrides: dict[str, str], port: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, FLYWHEEL_PORT=str(port), FLYWHEEL_HOST="127.0.0.1",
               FLYWHEEL_LOG_LEVEL="warning", **env_overrides)
    log = log_path.open("wb")
    return subprocess.Popen([sys.executable, "-m", "flywheel.cli", "serve"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def live_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`flywheel serve` as a separate process on the tiny real model and SQLite."""
    tmp = tmp_path_factory.mktemp("live")
    port = free_port()
    proc = spawn_server({"FLYWHEEL_MODEL": str(tiny_model_dir),
                         "FLYWHEEL_DATA_DIR": str(tmp),
                         "FLYWHEEL_DATABASE_URL": f"sqlite:///{tmp / 'live.db'}",
                         "FLYWHEEL_ADMIN_KEY": "", "FLYWHEEL_API_KEYS": ""},
                        port, tmp / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        stop_server(proc)


def live_app(tmp_path: Path, store: Store, engine: Engine, **settings: object
             ) -> ThreadServer:
    """The app on ``engine`` and ``store`` served on a free port (enter it to start)."""
    settings_ = make_settings(tmp_path, f"sqlite:///{tmp_path / 'flywheel.db'}", **settings)
    return ThreadServer(create_app(settings_, engine=engine, store=store, watch=False),
                        free_port())
