"""The console's static page and the hourly history it charts (the browser test is
test_console_browser.py)."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from fastapi.testclient import TestClient

from feedback_store import NewChoice, NewCompletion, Store
from feedback_store.models import Feedback
from server.app import create_app
from server.engines.fake import FakeEngine
from tests.server.conftest import make_settings

HOUR = 3600


def seed_thumbs(store: Store, version: str, up: int, down: int, hours_ago: int,
                now: float | None = None) -> None:
    """``up`` and ``down`` thumbs on an answer of ``version``, stored ``hours_ago`` hours ago."""
    stamp = (now or time.time()) - hours_ago * HOUR
    cid = f"chatcmpl-{version}-{hours_ago}-{up}-{down}-{time.monotonic_ns()}"
    store.record_completion(NewCompletion(
        id=cid, kind="chat", prompt_text="What is 2 plus 3?", prompt_token_ids=[1, 2, 3],
        messages=[{"role": "user", "content": "What is 2 plus 3?"}], model="flywheel",
        policy_version=version, params={"n": 1}, created_at=stamp,
        choices=[NewChoice(0, "5", [4], [-0.1], "stop")]))
    with store.engine.connect() as conn:
        before = conn.scalar(sa.select(sa.func.max(Feedback.id))) or 0
    store.add_feedbacks([{"completion_id": cid, "choice_index": 0, "rating": rating}
                         for rating in ["up"] * up + ["down"] * down])
    with store.engine.begin() as conn:
        conn.execute(sa.update(Feedback).where(Feedback.id > before)
                     .values(created_at=datetime.fromtimestamp(stamp, timezone.utc)))


def test_history_per_hour_and_version(client: TestClient, store: Store) -> None:
    now = (time.time() // HOUR) * HOUR + 1800  # mid-hour: buckets do not depend on the clock
    seed_thumbs(store, "policy-0", up=1, down=3, hours_ago=5, now=now)
    seed_thumbs(store, "policy-1", up=4, down=1, hours_ago=2, now=now)
    seed_thumbs(store, "policy-0", up=2, down=0, hours_ago=2, now=now)
    seed_thumbs(store, "policy-1", up=9, down=1, hours_ago=60, now=now)  # before the window
    end = int(now) // HOUR * HOUR + HOUR
    page = client.get("/v1/history/approval", params={"hours": 48, "before": end}).json()
    assert page["end"] == end and page["start"] == end - 48 * HOUR
    rows = [(r["hour"], r["version"], r["up"], r["down"]) for r in page["data"]]
    hour = lambda ago: end - HOUR - ago * HOUR  # noqa: E731
    assert rows == [(hour(5), "policy-0", 1, 3), (hour(2), "policy-0", 2, 0),
                    (hour(2), "policy-1", 4, 1)]
    assert page["data"][0]["approval"] == 0.25 and len(page["data"][0]["interval"]) == 2
    assert page["has_more"] is True and page["next_before"] == page["start"]

    earlier = client.get("/v1/history/approval",
                         params={"hours": 48, "before": page["next_before"]}).json()
    assert [(r["version"], r["up"]) for r in earlier["data"]] == [("policy-1", 9)]
    assert earlier["has_more"] is False and earlier["next_before"] is None

    volume = client.get("/v1/history/feedback", params={"hours": 48, "before": end}).json()
    assert [(r["hour"], r["up"], r["down"], r["ratings"]) for r in volume["data"]] == [
        (hour(5), 1, 3, 4), (hour(2), 6, 1, 7)]


def test_history_buckets_whole_hours(client: TestClient, store: Store) -> None:
    """Thumbs given at different minutes of one hour are one row (SQLite divided by 3600 as a
    float, and made a row of every second)."""
    start = (time.time() // HOUR) * HOUR - 3 * HOUR
    for minute, (up, down) in ((1, (1, 0)), (20, (0, 1)), (59, (2, 0))):
        seed_thumbs(store, "policy-0", up=up, down=down, hours_ago=0, now=start + minute * 60)
    end = int(start) + 2 * HOUR
    volume = client.get("/v1/history/feedback", params={"hours": 2, "before": end}).json()
    assert [(r["hour"], r["up"], r["down"]) for r in volume["data"]] == [(int(start), 3, 1)]
    page = client.get("/v1/history/approval", params={"hours": 2, "before": end}).json()
    assert [(r["version"], r["approval"]) for r in page["data"]] == [("policy-0", 0.75)]


def test_history_defaults_to_now_and_bounds_its_page(client: TestClient, store: Store) -> None:
    seed_thumbs(store, "policy-0", up=2, down=1, hours_ago=0)
    page = client.get("/v1/history/feedback").json()
    assert [(r["up"], r["down"]) for r in page["data"]] == [(2, 1)]
    assert page["end"] - page["start"] == 48 * HOUR and page["end"] > time.time()
    for params in ({"hours": 0}, {"hours": 100000}, {"before": -1}, {"hours": "x"}):
        response = client.get("/v1/history/approval", params=params)
        assert response.status_code == 400, params
        assert response.json()["error"]["param"] is not None


def test_history_query_uses_the_time_index(store: Store) -> None:
    """The page is a range scan of ix_feedback_created_at, not a scan of all feedback."""
    statement = "SELECT id FROM feedback WHERE created_at >= :a AND created_at < :b"
    with store.engine.connect() as conn:
        if store.dialect == "sqlite":
            plan = " ".join(str(r) for r in conn.execute(
                sa.text(f"EXPLAIN QUERY PLAN {statement}"), {"a": "2026", "b": "2027"}))
        else:
            conn.execute(sa.text("SET enable_seqscan = off"))
            plan = " ".join(r[0] for r in conn.execute(sa.text(
                f"EXPLAIN {statement}"), {"a": "2026-01-01", "b": "2027-01-01"}))
    assert "ix_feedback_created_at" in plan


def test_console_loads_without_a_key_when_keys_are_set(tmp_path: Path, sqlite_url: str,
                                                       store: Store) -> None:
    settings = make_settings(tmp_path, sqlite_url, api_keys="user-key", admin_key="admin-key")
    app = create_app(settings, engine=FakeEngine(), store=store, watch=False)
    with TestClient(app) as client:
        page = client.get("/console")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for name in ("console.js", "console.css", "uPlot.iife.min.js", "uPlot.min.css",
                     "uPlot.LICENSE"):
            assert client.get(f"/console/static/{name}").status_code == 200, name
        assert "MIT" in client.get("/console/static/uPlot.LICENSE").text
        assert client.get("/console/static/..%2Fapi_router.py").status_code == 404
        assert client.get("/console/static/nothing.js").status_code == 404
        # The page's data stays behind the admin key.
        assert client.get("/v1/history/approval").status_code == 401
        assert client.get("/v1/history/approval", headers={
            "Authorization": "Bearer user-key"}).status_code == 403
        assert client.get("/v1/history/approval", headers={
            "Authorization": "Bearer admin-key"}).status_code == 200
        assert client.get("/docs").status_code == 404  # still closed


def test_console_keeps_the_key_out_of_urls() -> None:
    script = (Path(__file__).parents[2] / "server/console/static/console.js").read_text()
    assert "sessionStorage" in script and "localStorage" not in script
    assert "Authorization" in script
    assert "?key=" not in script and "api_key=" not in script
