"""The chat page in a real browser: Debian's Chromium driven by Playwright against a live server
(uvicorn in a thread, the fake engine, SQLite, the real Redis) with API keys set. Two streamed
turns, a thumb with a comment, a copy, a regeneration, an edit, a "which is better?" choice; the
rows are then read back from the store and the API. Skips where Chromium or Playwright is
missing (`.ci/run` installs Chromium)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from feedback_store import Store
from feedback_store.models import Choice, Completion, Feedback, ImplicitFeedback, Ranking
from flywheel.serving_plan import record_base_policy
from flywheel.settings import Settings
from server.app import create_app
from server.engines.fake import FakeEngine
from tests.server.conftest import ThreadServer, free_port
from tests.server.test_console_browser import CHROMIUM, CHROMIUM_ARGS, _browser_or_skip

USER_KEY = "chat-user-key"
ADMIN_KEY = "chat-admin-key"
CHAT = "/v1/chat/completions"


def _settings(tmp_path: Path, sqlite_url: str, redis_url: str) -> Settings:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "fake"}')
    (base / "model.safetensors").write_bytes(uuid.uuid4().bytes * 64)
    return Settings(data_dir=tmp_path, database_url=sqlite_url, model=str(base),
                    redis_url=redis_url, redis_namespace=f"chat-{uuid.uuid4().hex[:8]}",
                    api_keys=USER_KEY, admin_key=ADMIN_KEY)


def _stored(store: Store) -> dict[str, Any]:
    with store.engine.connect() as conn:
        return {
            "feedback": conn.execute(
                sa.select(Feedback.rating, Feedback.comment, Feedback.user,
                          Feedback.replaced_by.is_(None), Choice.completion_id)
                .join(Choice, Choice.id == Feedback.choice_id).order_by(Feedback.id)).all(),
            "rankings": conn.execute(sa.select(Ranking.user, Ranking.key_scope)).all(),
            "implicit": conn.execute(
                sa.select(ImplicitFeedback.signal, ImplicitFeedback.user, Choice.completion_id)
                .join(Choice, Choice.id == ImplicitFeedback.choice_id)
                .order_by(ImplicitFeedback.id)).all(),
            "completions": conn.execute(
                sa.select(Completion.id, Completion.user).order_by(Completion.created_at)).all(),
        }


def _answer(page: Any, turn: int, choice: int = 0) -> Any:
    return page.locator(f"li.turn[data-turn='{turn}'] .msg.assistant[data-choice='{choice}']")


def test_chat_page_streams_rates_ranks_and_signals(tmp_path: Path, sqlite_url: str,
                                                   redis_url: str) -> None:
    sync_api = _browser_or_skip()
    expect = sync_api.expect
    settings = _settings(tmp_path, sqlite_url, redis_url)
    store = Store(sqlite_url)
    store.upgrade()
    record_base_policy(settings, store)
    app = create_app(settings, engine=FakeEngine(policy_version="policy-0"), store=store,
                     watch=False)
    requests: list[dict[str, Any]] = []
    streamed: list[str] = []
    problems: list[str] = []
    try:
        with ThreadServer(app, free_port()) as server, sync_api.sync_playwright() as pw:
            home = httpx.get(server.url + "/")
            assert home.status_code == 200 and "chat.js" in home.text
            csp = home.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert "unsafe-inline" not in csp
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                # A CSP refusal or a script error shows here.
                page.on("console", lambda m: problems.append(m.text) if m.type == "error"
                        and "401" not in m.text else None)
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.on("request", lambda r: requests.append(r.post_data_json)
                        if r.url.endswith(CHAT) else None)
                page.on("response", lambda r: streamed.append(r.headers.get("content-type", ""))
                        if r.url.endswith(CHAT) else None)
                page.goto(server.url + "/")

                # Keys are set: the page asks for one and keeps it for this tab's session.
                page.wait_for_selector("#key-dialog[open]")
                page.fill("#key-input", USER_KEY)
                page.click("#key-submit")
                expect(page.locator("#model")).to_have_text("flywheel")
                assert page.evaluate("sessionStorage.getItem('flywheel.apiKey')") == USER_KEY
                browser_id = page.evaluate("localStorage.getItem('flywheel.browserId')")
                assert browser_id.startswith("browser-") and USER_KEY not in page.url

                # Two turns, streamed; the second carries the first answer.
                page.fill("#prompt", "What is 7 plus 5?")
                page.click("#send")
                page.wait_for_selector("body[data-asked='1']")
                first = _answer(page, 0).locator(".text").inner_text()
                assert first
                page.fill("#prompt", "And times two?")
                page.press("#prompt", "Enter")
                page.wait_for_selector("body[data-asked='2']")
                assert [r["stream"] for r in requests] == [True, True]
                assert all(t.startswith("text/event-stream") for t in streamed), streamed
                assert requests[1]["messages"] == [
                    {"role": "user", "content": "What is 7 plus 5?"},
                    {"role": "assistant", "content": first},
                    {"role": "user", "content": "And times two?"}]
                assert {r["user"] for r in requests} == {browser_id}

                # A thumb down, then a comment on it; a copy.
                _answer(page, 1).locator("button[data-action='down']").click()
                expect(_answer(page, 1).locator(".comment-input")).to_be_visible()
                _answer(page, 1).locator(".comment-input").fill("too short")
                _answer(page, 1).locator("button[data-action='comment']").click()
                expect(_answer(page, 1).locator(".status")).to_have_text("Comment sent.")
                _answer(page, 1).locator("button[data-action='copy']").click()
                expect(_answer(page, 1).locator(".status")).to_have_text("Copied.")

                # Regenerate: the same conversation asked again.
                page.click("button[data-action='regenerate']")
                page.wait_for_selector("body[data-asked='3']")
                assert requests[2]["messages"] == requests[1]["messages"]

                # Edit the second question and send it again.
                page.locator("li.turn[data-turn='1'] button[data-action='edit']").click()
                expect(page.locator("#prompt")).to_have_value("And times two?")
                page.fill("#prompt", "And times three?")
                page.click("#send")
                page.wait_for_selector("body[data-asked='4']")
                assert requests[3]["messages"][-1]["content"] == "And times three?"
                assert page.locator("li.turn").count() == 2

                # Which is better? Two answers, pick the second.
                page.check("#compare")
                page.fill("#prompt", "Tell me a story.")
                page.click("#send")
                page.wait_for_selector("body[data-asked='5']")
                assert requests[4]["n"] == 2
                expect(_answer(page, 2, 1)).to_be_visible()
                _answer(page, 2, 1).locator("button[data-action='better']").click()
                expect(page.locator("li.turn[data-turn='2'] .msg.chosen")).to_have_attribute(
                    "data-choice", "1")
                page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
            finally:
                browser.close()
            policies = httpx.get(server.url + "/v1/policies",
                                 headers={"Authorization": f"Bearer {USER_KEY}"}).json()
        assert problems == []

        rows = _stored(store)
        ids = [cid for cid, _ in rows["completions"]]
        assert len(ids) == 5 and {user for _, user in rows["completions"]} == {browser_id}
        second, regenerated = ids[1], ids[2]
        # The thumb, then the same thumb with its comment (which replaced it).
        assert [tuple(r) for r in rows["feedback"]] == [
            ("down", None, browser_id, False, second),
            ("down", "too short", browser_id, True, second)]
        assert len(rows["rankings"]) == 1 and rows["rankings"][0][0] == browser_id
        assert [tuple(r) for r in rows["implicit"]] == [
            ("copy", browser_id, second), ("regenerate", browser_id, second),
            ("edit", browser_id, regenerated)]
        (base,) = [v for v in policies["data"] if v["id"] == "policy-0"]
        assert base["implicit"] == {"regenerate": 1, "edit": 1, "copy": 1}
    finally:
        store.close()
