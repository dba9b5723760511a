"""What anyone with Redis access can write: replica reports that do not parse are skipped (and
logged once), and `GET /v1/policies` stays 200; floods of policy messages cost little."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import redis

from feedback_store import Store
from flywheel.serving_plan import RedisKeys, ServingPlan, replica_report
from flywheel.settings import Settings
from server import hotswap
from tests.server.hotswap.conftest import checkpoint, redis_followed, serving, wait_for


def test_malformed_reports_are_skipped(settings: Settings, store: Store, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    checkpoint(settings, store, tmp_path, "policy-0", status="active")
    client = redis.Redis.from_url(settings.redis_url)
    servers = RedisKeys(settings.redis_namespace).servers
    try:
        with serving(settings, store) as (http, _):
            assert redis_followed(http)
            client.hset(servers, mapping={
                "evil": '{"at": "soon"}', "list": "[1, 2]", "text": "not json",
                "no-active": json.dumps({"at": time.time()}),
                "odd-active": json.dumps({"active": 3, "at": time.time()})})
            with caplog.at_level(logging.WARNING, logger="flywheel.serving_plan"):
                for _ in range(3):
                    listed = http.get("/v1/policies")
                    assert listed.status_code == 200, listed.text
                    assert [r["id"] for r in listed.json()["replicas"]] != []
                    assert {"evil", "list", "text", "no-active", "odd-active"}.isdisjoint(
                        r["id"] for r in listed.json()["replicas"])
            warned = [r for r in caplog.records if "does not parse" in r.getMessage()]
            assert len(warned) == 5  # once per bad entry, not once per poll
    finally:
        client.delete(servers)
        client.close()


def test_a_report_has_one_shape() -> None:
    good = replica_report(json.dumps({"active": "policy-1", "canary": None, "at": 5}))
    assert good == {"active": "policy-1", "canary": None, "at": 5.0}
    for raw in ("", "null", '"x"', '{"active": "p", "at": []}', '{"active": "p", "canary": 1,'
                ' "at": 1}', b"\xff"):
        assert replica_report(raw) is None, raw


def test_a_flood_of_policy_messages_costs_little(settings: Settings, store: Store,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Anyone who can publish on Redis can send thousands of messages: those that change
    nothing cost no SQL read, malformed ones one log line; a real change still lands."""
    active = checkpoint(settings, store, tmp_path, "policy-0", status="active")
    checkpoint(settings, store, tmp_path, "policy-1")
    reads = {"n": 0}
    read_sql = hotswap.read_sql

    def counted(store: Store) -> object:
        reads["n"] += 1
        return read_sql(store)

    monkeypatch.setattr(hotswap, "read_sql", counted)
    with serving(settings, store) as (http, engine):
        assert redis_followed(http)
        watcher = http.app.state.flywheel.watcher  # type: ignore[attr-defined]
        before = reads["n"]
        same = ServingPlan(active).to_json()
        with caplog.at_level(logging.INFO, logger="server.hotswap"):
            for _ in range(1000):
                http.portal.call(watcher._on_message, same)  # type: ignore[union-attr]
                http.portal.call(watcher._on_message, b"{not json")  # type: ignore[union-attr]
        assert reads["n"] - before == 0
        lines = [r.getMessage() for r in caplog.records if "policy message" in r.getMessage()]
        assert len(lines) == 1 and "1 malformed" in lines[0], lines
        started = http.post("/v1/policies/policy-1/canary", json={"fraction": 0.5})
        assert started.status_code == 201, started.text
        assert wait_for(lambda: engine.canary_version, lambda v: v == "policy-1") == "policy-1"
