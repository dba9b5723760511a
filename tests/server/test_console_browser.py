"""The console in a real browser: Debian's Chromium driven by Playwright against a live server
(uvicorn in a thread, the fake engine, SQLite, the real Redis) holding real versions, runs and
thumbs. Skips where Chromium or Playwright is missing (`.ci/run` installs Chromium).

FLYWHEEL_CONSOLE_SCREENSHOT=docs/console.png saves the screenshot there (else in tmp_path).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from feedback_store import Store
from flywheel.serving_plan import record_base_policy
from flywheel.settings import Settings
from server.app import create_app
from server.engines.fake import FakeEngine
from tests.helpers import make_checkpoint
from tests.server.conftest import ThreadServer, free_port
from tests.server.hotswap.conftest import wait_for
from tests.server.test_console import seed_thumbs

ADMIN_KEY = "console-admin-key"
CHROMIUM = os.environ.get("FLYWHEEL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# As the machine's own probe starts it: no sandbox as root, and no calls to Google's hosts,
# which a closed network refuses many at a time.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]


def _browser_or_skip():  # returns playwright.sync_api
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set "
                    "FLYWHEEL_CHROMIUM); `.ci/run` installs it")
    return sync_api


@pytest.fixture
def seeded(tmp_path: Path, sqlite_url: str, redis_url: str) -> Iterator[tuple[Settings, Store]]:
    """Four versions (policy-2 active, policy-0 and policy-1 retired, policy-3 rejected by the
    gate), three training cycles and two days of thumbs."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "fake"}')
    (base / "model.safetensors").write_bytes(uuid.uuid4().bytes * 64)
    settings = Settings(data_dir=tmp_path, database_url=sqlite_url, model=str(base),
                        redis_url=redis_url, redis_namespace=f"console-{uuid.uuid4().hex[:8]}",
                        admin_key=ADMIN_KEY)
    store = Store(sqlite_url)
    store.upgrade()
    record_base_policy(settings, store)
    root = Path(settings.checkpoint_dir or tmp_path / "checkpoints") / "policies"
    for version, parent, status in (("policy-1", "policy-0", "active"),
                                    ("policy-2", "policy-1", "active"),
                                    ("policy-3", "policy-2", "rejected")):
        make_checkpoint(base, root / version, version, parent=parent, store=store, status=status)
    store.add_reward_model(id="rm-1", parent=None, path=None, sha256=None)
    runs = [
        ("succeeded", "policy-1", "rm-1", {"reward/accuracy": 0.78, "reward/accuracy_low": 0.66,
         "reward/holdout_pairs": 13, "reward/cross_validated_pairs": 48,
         "reward/judged_pairs": 61, "ppo/kl_ref_final": 0.59, "gate/score_gain": 0.41,
         "gate/score_gain_low": 0.22, "gate/reasons": [], "cycle/seconds": 71,
         "cycle/release": "canary"}),
        *[("skipped", None, None, {"cycle/skip_reason": "too little evidence: 9 held-out "
                                   "pairs, need 12"})] * 2,
        ("skipped", None, None, {"cycle/skip_reason": "reward model held-out accuracy 0.61, "
                                 "lower bound 0.48 < 0.55", "reward/accuracy": 0.61,
                                 "reward/accuracy_low": 0.48}),
        ("rejected", "policy-3", None, {"reward/accuracy": 0.83, "reward/accuracy_low": 0.71,
         "ppo/kl_ref_final": 12.5, "gate/score_gain": 0.02, "gate/score_gain_low": -0.05,
         "gate/reasons": ["KL to base 12.5 > budget 10"], "cycle/seconds": 66}),
    ]
    for status, policy, reward_model, metrics in runs:
        run = store.create_training_run(trigger="feedback")
        store.update_training_run(run["id"], status=status, policy_id=policy, metrics=metrics,
                                  reward_model_id=reward_model)
    for hours_ago in range(40, 0, -1):
        version, good = (("policy-0", 3) if hours_ago > 28 else ("policy-1", 7)
                         if hours_ago > 12 else ("policy-2", 8))
        spread = hours_ago % 3
        seed_thumbs(store, version, up=good + spread, down=10 - good, hours_ago=hours_ago)
    yield settings, store
    store.close()


def _served(url: str) -> str:
    return httpx.get(url + "/v1/policies", timeout=10).json()["served"]


def test_console_shows_versions_and_rolls_back(seeded: tuple[Settings, Store],
                                               tmp_path: Path) -> None:
    sync_api = _browser_or_skip()
    settings, store = seeded
    app = create_app(settings, engine=FakeEngine(policy_version="policy-0"), store=store,
                     watch=True)
    shot = Path(os.environ.get("FLYWHEEL_CONSOLE_SCREENSHOT") or tmp_path / "console.png")
    with ThreadServer(app, free_port()) as server, sync_api.sync_playwright() as pw:
        assert wait_for(lambda: _served(server.url), lambda v: v == "policy-2") == "policy-2"
        policies = httpx.get(server.url + "/v1/policies").json()
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("dialog", lambda dialog: dialog.accept())  # the confirm() before an action
            page.goto(server.url + "/console")

            # Keys are set: the page asks for the admin key and keeps it for the session only.
            page.wait_for_selector("#key-dialog[open]")
            page.fill("#key-input", ADMIN_KEY)
            page.click("#key-submit")
            page.wait_for_selector("#versions tbody tr[data-version='policy-3']")
            assert ADMIN_KEY not in page.url
            assert page.evaluate("sessionStorage.getItem('flywheel.adminKey')") == ADMIN_KEY
            assert page.evaluate("localStorage.length") == 0

            # A new load in the same session needs no key; time it to the first chart.
            page.reload()
            page.wait_for_selector("body[data-chart-rendered]", timeout=20_000)
            chart_ms = int(page.get_attribute("body", "data-chart-rendered") or -1)
            print(f"\nconsole: navigation start to first rendered chart: {chart_ms} ms")
            assert not page.is_visible("#key-dialog")
            page.wait_for_selector("#approval-chart canvas")
            page.wait_for_selector("#volume-chart canvas")

            # Every version the API lists, with its live approval as the API gives it.
            page.wait_for_selector("#versions tbody tr[data-version='policy-3']")
            for version in policies["data"]:
                row = page.locator(f"#versions tbody tr[data-version='{version['id']}']")
                approval = row.locator("td.approval").inner_text()
                live = version["live"]
                if live["ratings"]:
                    assert f"{100 * live['approval']:.1f}%" in approval, (version["id"], approval)
                else:
                    assert approval == "no thumbs yet"
            assert page.locator("#summary #served .value").inner_text() == "policy-2"
            assert page.locator("#runs tbody tr").count() == 3  # three skips in a row: one
            assert "3 cycles skipped; the last: reward model held-out accuracy 0.61, lower bound " \
                   "0.48" in page.locator("#runs tbody").inner_text()
            reward_models = page.locator("#reward-models tbody").inner_text()
            assert "rm-1" in reward_models
            assert "61 (13 held-out, 48 cross-validated)" in reward_models
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)

            # Roll back: a click, then the API says policy-1 is served.
            button = page.locator("#versions button[data-action='activate']"
                                  "[data-version='policy-1']")
            assert button.inner_text() == "Roll back"
            button.click()
            assert wait_for(lambda: _served(server.url), lambda v: v == "policy-1") == "policy-1"
            # A locator assertion polls without evaluating a string in the page, which the
            # console's CSP (no 'unsafe-eval') refuses to wait_for_function once it has to poll.
            sync_api.expect(page.locator("#summary #served .value")).to_have_text(
                "policy-1", timeout=15_000)
            assert store.active_policy()["id"] == "policy-1"
        finally:
            browser.close()
