"""Hot swaps on a fake engine, a real Redis and SQLite: publish, refuse, late start, outages."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from feedback_store import Store
from flywheel import serving_plan
from flywheel.checkpoints import CheckpointError
from flywheel.embedded_redis import EmbeddedRedis
from flywheel.serving_plan import PolicyMessage, RedisKeys, record_base_policy
from flywheel.settings import Settings
from server import hotswap
from tests.helpers import make_checkpoint
from tests.server.hotswap.conftest import (
    CHAT,
    _preload_key,
    _settings_on,
    checkpoint,
    initial_policy,
    publish_policy,
    redis_followed,
    served,
    serving,
    swaps,
    wait_for,
)


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


def test_initial_policy_follows_no_key_while_sql_cannot_be_read(
    settings: Settings, store: Store, tmp_path: Path, publish: Callable[[PolicyMessage], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record_base_policy(settings, store)
    publish(checkpoint(settings, store, tmp_path, "policy-1", status="active"))
    monkeypatch.setattr(serving_plan, "read_sql", lambda store: None)
    assert initial_policy(settings, store) == (settings.model, "policy-0")


def test_a_changed_base_model_is_refused_at_start(settings: Settings, store: Store) -> None:
    """The base model is checked like any version, against the digest its first start recorded."""
    record_base_policy(settings, store)
    assert initial_policy(settings, store) == (settings.model, "policy-0")
    (Path(settings.model) / "model.safetensors").write_bytes(b"swapped weights")
    with pytest.raises(CheckpointError, match="recorded digest"):
        initial_policy(settings, store)


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

    SQL reads are switched off once the server has seen policy-1 there (on canary: a version
    SQL never showed it is not loaded on Redis's word alone), so only the key can promote it.
    ``outage_s`` 0: Redis is back before a client retrying on its own would have given up.
    """
    settings = _settings_on(settings, own_redis)
    keys = RedisKeys(settings.redis_namespace)
    record_base_policy(settings, store)
    with serving(settings, store) as (client, engine):
        assert redis_followed(client)
        checkpoint(settings, store, tmp_path, "policy-1")
        assert client.post("/v1/policies/policy-1/canary", json={"fraction": 0.5}
                           ).status_code == 201
        assert wait_for(lambda: engine.canary_version, lambda v: v == "policy-1") == "policy-1"
        monkeypatch.setattr(hotswap, "read_sql", lambda store: None)  # SQL unreachable
        message = PolicyMessage.from_row(store.get_policy("policy-1"))
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


def _outside_the_root(message: PolicyMessage) -> PolicyMessage:
    outside = Path(message.path).parents[2] / "elsewhere" / message.version
    shutil.copytree(message.path, outside)
    return PolicyMessage(message.version, str(outside), message.sha256)


def _climbing_out(message: PolicyMessage) -> PolicyMessage:
    outside = _outside_the_root(message)
    return PolicyMessage(message.version, f"{message.path}/../../../elsewhere/{message.version}",
                         outside.sha256)


def _without_digest(message: PolicyMessage) -> PolicyMessage:
    return PolicyMessage(message.version, message.path, "")


def _as_sealed(message: PolicyMessage) -> PolicyMessage:
    return message  # sealed and in place, but SQL never showed it to this server


@pytest.mark.parametrize("forge", [_outside_the_root, _climbing_out, _without_digest,
                                   _as_sealed])
def test_while_sql_is_away_redis_is_still_checked(
    settings: Settings, store: Store, tmp_path: Path, publish: Callable[[PolicyMessage], None],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    forge: Callable[[PolicyMessage], PolicyMessage],
) -> None:
    """Without SQL, an announcement alone loads nothing new: not a forged message, and not a
    sealed checkpoint that SQL never showed this server (whoever writes Redis can seal one)."""
    caplog.set_level(logging.ERROR, logger="server.hotswap")
    monkeypatch.setattr(hotswap, "read_sql", lambda store: None)
    with serving(settings, store) as (client, engine):
        assert redis_followed(client)
        publish(forge(checkpoint(settings, store, tmp_path, "policy-1", status="active")))
        assert wait_for(lambda: swaps(client, "refused"), lambda n: n >= 1) == 1
        assert served(client) == "policy-0" and engine.swaps == []
        assert any("refused policy policy-1" in r.getMessage() for r in caplog.records)


def test_another_architecture_is_refused(
    settings: Settings, store: Store, tmp_path: Path, publish: Callable[[PolicyMessage], None],
) -> None:
    """Recorded in SQL and sealed, but with a shorter context than the served base model."""
    (Path(settings.model) / "config.json").write_text(
        '{"model_type": "fake", "max_position_embeddings": 512}')
    other = tmp_path / "other-base"
    shutil.copytree(settings.model, other)
    (other / "config.json").write_text('{"model_type": "fake", "max_position_embeddings": 16}')
    with serving(settings, store) as (client, engine):
        assert redis_followed(client)
        publish(make_checkpoint(other, Path(settings.checkpoint_dir or "") / "policies" /
                                "policy-1", "policy-1", store=store, status="active"))
        assert wait_for(lambda: swaps(client, "refused"), lambda n: n >= 1) == 1
        assert served(client) == "policy-0" and engine.swaps == []


def test_activating_a_damaged_checkpoint_is_refused(settings: Settings, store: Store,
                                                    tmp_path: Path) -> None:
    checkpoint(settings, store, tmp_path, "policy-0", status="active")
    damaged = checkpoint(settings, store, tmp_path, "policy-1")
    (Path(damaged.path) / "model.safetensors").write_bytes(b"damaged after sealing")
    with serving(settings, store) as (client, _):
        for route in ("/v1/policies/policy-1/activate", "/v1/policies/policy-1/canary"):
            response = client.post(route)
            assert response.status_code == 409, response.text
            assert response.json()["error"]["code"] == "checkpoint_invalid"
        assert store.active_policy()["id"] == "policy-0"
        assert store.get_policy("policy-1")["status"] == "candidate"
        assert served(client) == "policy-0"
