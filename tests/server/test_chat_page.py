"""The chat page's static files (the browser test is test_chat_browser.py)."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from feedback_store import Store
from server.app import create_app
from server.engines.fake import FakeEngine
from tests.server.conftest import make_settings

STATIC = Path(__file__).parents[2] / "server/chat/static"


def test_chat_page_loads_without_a_key_when_keys_are_set(tmp_path: Path, db_url: str,
                                                         store: Store) -> None:
    settings = make_settings(tmp_path, db_url, api_keys="user-key")
    app = create_app(settings, engine=FakeEngine(), store=store, watch=False)
    with TestClient(app) as client:
        for path in ("/", "/chat"):
            page = client.get(path)
            assert page.status_code == 200, path
            assert page.headers["content-type"].startswith("text/html")
            csp = page.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert "unsafe" not in csp
            assert page.headers["x-content-type-options"] == "nosniff"
        for name, media in (("chat.js", "text/javascript"), ("chat.css", "text/css"),
                            ("favicon.svg", "image/svg+xml")):
            response = client.get(f"/chat/static/{name}")
            assert response.status_code == 200, name
            assert response.headers["content-type"].startswith(media)
        assert client.get("/chat/static/..%2Fapi_router.py").status_code == 404
        assert client.get("/chat/static/nothing.js").status_code == 404
        assert client.get("/v1/models").status_code == 401  # the API stays behind the key


def test_chat_script_builds_the_page_with_dom_apis_only() -> None:
    script = (STATIC / "chat.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(",
                         script)
    # The key for this tab's session only, never in a URL; the browser's id in localStorage.
    assert 'sessionStorage.getItem(KEY)' in script and "?key=" not in script
    assert re.findall(r"localStorage\.\w+\((\w+)", script) == ["BROWSER", "BROWSER"]
    assert '"Content-Type"] = "application/json"' in script
    html = (STATIC / "index.html").read_text()
    # No inline script or handler: the CSP would refuse them.
    assert "<script>" not in html and not re.search(r"\son\w+=", html)
