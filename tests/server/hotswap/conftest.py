"""Fixtures and helpers of the hot-swap and canary tests: fake engines on SQLite and a real Redis
(the shared one, or one a test may stop and restart)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from fastapi.testclient import TestClient

from feedback_store import Store
from flywheel import serving_plan
from flywheel.embedded_redis import EmbeddedRedis
from flywheel.serving_plan import PolicyMessage, Publisher, RedisKeys, ServingPlan
from flywheel.settings import Settings
from server.app import create_app
from server.engines.fake import FakeEngine
from tests.helpers import make_checkpoint

T = TypeVar("T")
CHAT = {"model": "flywheel", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
WAIT_S = 10.0  # generous: 2 shared cores; the SQL recheck (30 s) is far beyond it


def wait_for(probe: Callable[[], T], done: Callable[[T], bool], timeout: float = WAIT_S) -> T:
    """Call ``probe`` until ``done(value)``; returns the last value either way."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = probe()
    return value


def served(client: TestClient) -> str:
    """The version a fresh completion is labelled with (header and fingerprint must agree)."""
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    assert response.headers["X-Flywheel-Policy"] == response.json()["system_fingerprint"]
    return response.headers["X-Flywheel-Policy"]


def swaps(client: TestClient, outcome: str) -> float:
    line = f'flywheel_policy_swaps_total{{outcome="{outcome}"}} '
    for row in client.get("/metrics").text.splitlines():
        if row.startswith(line):
            return float(row[len(line):])
    return 0.0


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    """Stands in for a model directory: the fake engine only needs a directory to exist."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "fake"}')
    (base / "model.safetensors").write_bytes(uuid.uuid4().bytes * 64)
    return base


@pytest.fixture
def database() -> str:
    """These tests run on SQLite only: `store` (tests/conftest.py) is on `sqlite_url`."""
    return "sqlite"


@pytest.fixture
def settings(tmp_path: Path, sqlite_url: str, redis_url: str, redis_namespace: str,
             base_dir: Path) -> Settings:
    return Settings(data_dir=tmp_path, database_url=sqlite_url, model=str(base_dir),
                    redis_url=redis_url, redis_namespace=redis_namespace)


def initial_policy(settings: Settings, store: Store) -> tuple[str, str]:
    publisher = Publisher.from_url(settings.redis_url, settings.redis_namespace)
    try:
        plan = serving_plan.initial_plan(settings, store, publisher)
    finally:
        publisher.close()
    return plan.active.path, plan.active.version


def publish_policy(client: redis.Redis, keys: RedisKeys, message: PolicyMessage) -> None:
    assert Publisher(client, keys).announce(ServingPlan(message))


@pytest.fixture
def publish(settings: Settings) -> Iterator[Callable[[PolicyMessage], None]]:
    client = redis.Redis.from_url(settings.redis_url)
    keys = RedisKeys(settings.redis_namespace)
    yield lambda message: publish_policy(client, keys, message)
    client.delete(keys.active_policy, keys.canary_policy)
    client.close()


@contextmanager
def serving(settings: Settings, store: Store, version: str = "policy-0"
            ) -> Iterator[tuple[TestClient, FakeEngine]]:
    engine = FakeEngine(policy_version=version)
    with TestClient(create_app(settings, engine=engine, store=store, watch=True)) as client:
        yield client, engine


def redis_followed(client: TestClient, connected: bool = True) -> bool:
    return wait_for(lambda: client.get("/readyz").json().get("redis"),
                    lambda v: v is connected) is connected


def checkpoint(settings: Settings, store: Store, tmp_path: Path, version: str,
               status: str = "candidate") -> PolicyMessage:
    root = Path(settings.checkpoint_dir or tmp_path / "checkpoints")
    return make_checkpoint(Path(settings.model), root / "policies" / version, version,
                           parent="policy-0", store=store, status=status)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis this test may stop and start again on the same port."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def _settings_on(settings: Settings, server: EmbeddedRedis) -> Settings:
    return settings.model_copy(update={"redis_url": server.url})


def _preload_key(server: EmbeddedRedis, keys: RedisKeys, raw: str) -> None:
    """Leave a dump.rdb holding the active key, so ``server`` restarts with it already set."""
    with EmbeddedRedis(server.directory) as scratch:
        client = redis.Redis.from_url(scratch.url)
        client.set(keys.active_policy, raw)
        client.save()
        client.close()


