"""Hot swaps on a fake engine, a real Redis and SQLite: publish, refuse, late start, outages."""

from __future__ import annotations

import json
import logging
import shutil
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
from flywheel.embedded_redis import EmbeddedRedis
from flywheel.hotswap import PolicyMessage, Publisher, RedisKeys, ServingPlan
from flywheel.serving_plan import record_base_policy
from flywheel.settings import Settings
from server import hotswap
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
def store(sqlite_url: str) -> Iterator[Store]:
    s = Store(sqlite_url)
    s.upgrade()
    yield s
    s.close()


@pytest.fixture
def settings(tmp_path: Path, sqlite_url: str, redis_url: str, redis_namespace: str,
             base_dir: Path) -> Settings:
    return Settings(data_dir=tmp_path, database_url=sqlite_url, model=str(base_dir),
                    redis_url=redis_url, redis_namespace=redis_namespace)


def initial_policy(settings: Settings, store: Store) -> tuple[str, str]:
    publisher = Publisher.from_url(settings.redis_url, settings.redis_namespace)
    try:
        plan = hotswap.initial_plan(settings, store, publisher)
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
    return make_checkpoint(Path(settings.model), tmp_path / "policies" / version, version,
                           parent="policy-0", store=store, status=status)


def test_publish_swaps_and_relabels(settings: Settings, store: Store, tmp_path: Path,
                                    publish: Callable[[PolicyMessage], None]) -> None:
    with serving(settings, store) as (client, engine):
        assert redis_followed(client)
        assert served(client) == "policy-0"
        message = checkpoint(settings, store, tmp_path, "policy-1", status="active")
        publish(message)
        assert wait_for(lambda: served(client), lambda v: v == "policy-1") == "policy-1"
        assert engine.swaps == [(message.path, "policy-1")]
        stream = {**CHAT, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=stream) as response:
            assert response.headers["X-Flywheel-Policy"] == "policy-1"
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert {json.loads(e)["system_fingerprint"] for e in events[:-1]} == {"policy-1"}
        assert swaps(client, "ok") == 1
        assert 'flywheel_policy_version_info{version="policy-1"} 1.0' in client.get(
            "/metrics").text


def _file_changed_after_sealing(message: PolicyMessage) -> PolicyMessage:
    with (Path(message.path) / "model.safetensors").open("r+b") as f:
        f.write(b"\xff\xfe")
    return message


def _weights_missing(message: PolicyMessage) -> PolicyMessage:
    (Path(message.path) / "model.safetensors").unlink()
    return message


@pytest.mark.parametrize("corrupt", [_file_changed_after_sealing, _weights_missing])
def test_corrupt_checkpoint_is_refused(
    settings: Settings, store: Store, tmp_path: Path, publish: Callable[[PolicyMessage], None],
    caplog: pytest.LogCaptureFixture, corrupt: Callable[[PolicyMessage], PolicyMessage],
) -> None:
    caplog.set_level(logging.ERROR, logger="server.hotswap")
    with serving(settings, store) as (client, engine):
        assert redis_followed(client)
        bad = corrupt(checkpoint(settings, store, tmp_path, "policy-1", status="active"))
        publish(bad)
        assert wait_for(lambda: swaps(client, "refused"), lambda n: n >= 1) == 1
        assert served(client) == "policy-0"
        assert engine.swaps == []
        assert any("refused policy policy-1" in r.getMessage() for r in caplog.records)
        # The watcher keeps following: a good checkpoint afterwards is served.
        publish(checkpoint(settings, store, tmp_path, "policy-2", status="active"))
        assert wait_for(lambda: served(client), lambda v: v == "policy-2") == "policy-2"
        assert swaps(client, "refused") == 1


def _digest_differs_from_sql(message: PolicyMessage) -> PolicyMessage:
    return PolicyMessage(message.version, message.path, "0" * 64)


def _unknown_to_sql(message: PolicyMessage) -> PolicyMessage:
    return PolicyMessage("evil-1", message.path, message.sha256)


def _elsewhere(message: PolicyMessage) -> PolicyMessage:
    copy = Path(message.path).parent / "tampered"
    shutil.copytree(message.path, copy)
    return PolicyMessage(message.version, str(copy), "")


@pytest.mark.parametrize("forge", [_digest_differs_from_sql, _unknown_to_sql, _elsewhere])
def test_redis_cannot_overrule_sql(
    settings: Settings, store: Store, tmp_path: Path, publish: Callable[[PolicyMessage], None],
    forge: Callable[[PolicyMessage], PolicyMessage],
) -> None:
    """While SQL can be read, a message is a nudge to read it: what it says is not served."""
    with serving(settings, store) as (client, engine):
        assert redis_followed(client)
        message = checkpoint(settings, store, tmp_path, "policy-1", status="candidate")
        publish(forge(message))
        publish(checkpoint(settings, store, tmp_path, "policy-2", status="active"))
        assert wait_for(lambda: served(client), lambda v: v == "policy-2") == "policy-2"
        assert [version for _, version in engine.swaps] == ["policy-2"]


def test_server_started_after_publish_starts_on_active(
    settings: Settings, store: Store, tmp_path: Path, publish: Callable[[PolicyMessage], None],
) -> None:
    record_base_policy(settings, store)
    message = checkpoint(settings, store, tmp_path, "policy-1", status="active")
    publish(message)  # nobody listens yet
    path, version = initial_policy(settings, store)
    assert (path, version) == (message.path, "policy-1")
    with serving(settings, store) as (client, engine):  # an engine loaded on the old weights
        assert wait_for(lambda: served(client), lambda v: v == "policy-1") == "policy-1"
        assert engine.swaps == [(message.path, "policy-1")]


def test_initial_policy_ignores_a_key_sql_does_not_know(
    settings: Settings, store: Store, tmp_path: Path, publish: Callable[[PolicyMessage], None],
) -> None:
    record_base_policy(settings, store)
    message = make_checkpoint(Path(settings.model), tmp_path / "elsewhere", "policy-7")
    publish(message)
    assert initial_policy(settings, store) == (settings.model, "policy-0")


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


def test_redis_down_then_back(settings: Settings, store: Store, tmp_path: Path,
                              own_redis: EmbeddedRedis) -> None:
    """Redis stops: the SQL poll finds an activation; Redis is back: publishes arrive again."""
    settings = _settings_on(settings, own_redis)
    keys = RedisKeys(settings.redis_namespace)
    with serving(settings, store) as (client, _):
        assert redis_followed(client)
        own_redis.stop()
        assert redis_followed(client, connected=False)
        checkpoint(settings, store, tmp_path, "policy-1", status="active")
        assert wait_for(lambda: served(client), lambda v: v == "policy-1") == "policy-1"
        own_redis.start()
        assert redis_followed(client)
        message = checkpoint(settings, store, tmp_path, "policy-2", status="active")
        with redis.Redis.from_url(own_redis.url) as r:
            publish_policy(r, keys, message)
        assert wait_for(lambda: served(client), lambda v: v == "policy-2") == "policy-2"


@pytest.mark.parametrize("outage_s", [0.0, 1.5])
def test_redis_restart_key_read_on_reconnect(
    settings: Settings, store: Store, tmp_path: Path, own_redis: EmbeddedRedis,
    monkeypatch: pytest.MonkeyPatch, outage_s: float,
) -> None:
    """The message is lost while Redis restarts; the key, read on reconnect, is not.

    SQL reads are switched off, so only the key can bring the server to the new version.
    ``outage_s`` 0: Redis is back before a client retrying on its own would have given up.
    """
    monkeypatch.setattr(hotswap, "read_sql", lambda store: None)  # as if SQL were unreachable
    settings = _settings_on(settings, own_redis)
    keys = RedisKeys(settings.redis_namespace)
    with serving(settings, store) as (client, _):
        assert redis_followed(client)
        message = checkpoint(settings, store, tmp_path, "policy-1", status="active")
        own_redis.stop()  # the publish that would follow cannot happen
        _preload_key(own_redis, keys, message.to_json())
        time.sleep(outage_s)
        own_redis.start()  # same port, the key already set, nothing published
        assert wait_for(lambda: served(client), lambda v: v == "policy-1") == "policy-1"
        assert redis_followed(client)


def test_activate_rolls_back_and_forward(settings: Settings, store: Store,
                                         tmp_path: Path) -> None:
    record_base_policy(settings, store)
    for version in ("policy-1", "policy-2"):
        checkpoint(settings, store, tmp_path, version)
    checkpoint(settings, store, tmp_path, "policy-3", status="rejected")
    with serving(settings, store) as (a, _), serving(settings, store) as (b, _):
        assert redis_followed(a) and redis_followed(b)
        for version in ("policy-2", "policy-1", "policy-2"):
            response = a.post(f"/v1/policies/{version}/activate")
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "active"
            assert response.json()["published"] is True
            assert served(a) == version  # the replica that was asked swaps before answering
            assert wait_for(lambda: served(b), lambda v, want=version: v == want) == version
            assert store.active_policy()["id"] == version
        missing = a.post("/v1/policies/policy-99/activate")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "policy_not_found"
        rejected = a.post("/v1/policies/policy-3/activate")
        assert rejected.status_code == 400
        assert rejected.json()["error"]["code"] == "policy_rejected"
        assert served(a) == served(b) == "policy-2"
        assert store.active_policy()["id"] == "policy-2"
        forced = a.post("/v1/policies/policy-3/activate", json={"force": True})
        assert forced.status_code == 200, forced.text
        assert wait_for(lambda: served(b), lambda v: v == "policy-3") == "policy-3"
        statuses = {p["id"]: p["status"] for p in a.get("/v1/policies").json()["data"]}
        assert statuses == {"policy-0": "retired", "policy-1": "retired",
                            "policy-2": "retired", "policy-3": "active"}


def test_rollback_while_redis_down_survives_the_stale_key(
    settings: Settings, store: Store, tmp_path: Path, own_redis: EmbeddedRedis,
) -> None:
    """SQL is the record of truth: a key left behind by Redis does not undo a rollback."""
    settings = _settings_on(settings, own_redis)
    keys = RedisKeys(settings.redis_namespace)
    record_base_policy(settings, store)
    checkpoint(settings, store, tmp_path, "policy-1")
    with serving(settings, store) as (a, _), serving(settings, store) as (b, _):
        assert redis_followed(a) and redis_followed(b)
        assert a.post("/v1/policies/policy-1/activate").json()["published"] is True
        new = checkpoint(settings, store, tmp_path, "policy-2")
        assert a.post("/v1/policies/policy-2/activate").json()["published"] is True
        assert wait_for(lambda: served(b), lambda v: v == "policy-2") == "policy-2"
        own_redis.stop()
        _preload_key(own_redis, keys, new.to_json())  # Redis will come back remembering policy-2
        assert redis_followed(a, connected=False)
        rollback = a.post("/v1/policies/policy-1/activate")
        assert rollback.status_code == 200 and rollback.json()["published"] is False
        assert wait_for(lambda: served(b), lambda v: v == "policy-1") == "policy-1"
        own_redis.start()
        assert redis_followed(a) and redis_followed(b)  # each has read the stale key by now
        assert served(a) == served(b) == "policy-1"
    assert initial_policy(settings, store)[1] == "policy-1"
