"""POST /v1/feedback/implicit: regenerate, edit and copy stored as their own kind of feedback,
with the thumbs' ownership rule (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import httpx
import sqlalchemy as sa
from fastapi.testclient import TestClient

from feedback_store import Store
from feedback_store.models import ImplicitFeedback
from feedback_store.types import IMPLICIT_SIGNALS
from server.app import create_app
from server.engines.fake import FakeEngine
from server.feedback.protocol import Signal
from tests.helpers import feedback_counts
from tests.server.conftest import make_settings
from tests.server.test_api import CHAT, assert_error, chat


def _implicit(client: TestClient, completion_id: str, signal: str = "regenerate", *,
              headers: dict[str, str] | None = None, **extra: object) -> httpx.Response:
    return client.post("/v1/feedback/implicit", headers=headers, json={
        "completion_id": completion_id, "choice_index": 0, "signal": signal, **extra})


def _rows(store: Store) -> list[tuple[str, str | None, str | None]]:
    with store.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(  # type: ignore[misc]
            sa.select(ImplicitFeedback.signal, ImplicitFeedback.user, ImplicitFeedback.key_scope)
            .order_by(ImplicitFeedback.id)).all()]


def test_the_wire_names_the_stored_signals() -> None:
    assert get_args(Signal) == IMPLICIT_SIGNALS


def test_signals_are_stored_and_counted_per_version(client: TestClient, store: Store) -> None:
    body = chat(client, n=2, user="browser-1")
    for signal, index in (("regenerate", 0), ("edit", 1), ("copy", 0), ("copy", 1)):
        response = _implicit(client, body["id"], signal, choice_index=index, user="browser-1")
        assert response.status_code == 201, response.text
        record = response.json()
        assert record["object"] == "implicit_feedback" and record["id"].startswith("im-")
        assert (record["completion_id"], record["choice_index"], record["signal"],
                record["user"]) == (body["id"], index, signal, "browser-1")
    assert _rows(store) == [("regenerate", "browser-1", None), ("edit", "browser-1", None),
                            ("copy", "browser-1", None), ("copy", "browser-1", None)]
    # Its own kind: no thumb, no ranking, nothing in approval.
    assert feedback_counts(store) == {"up": 0, "down": 0, "rankings": 0}
    # Counted per version (GET /v1/policies shows them: test_chat_browser.py).
    served = body["system_fingerprint"]
    assert store.implicit_counts() == {served: {"regenerate": 1, "edit": 1, "copy": 2}}


def test_unknown_answers_are_404(client: TestClient, store: Store) -> None:
    error = assert_error(_implicit(client, "chatcmpl-nothing"), 404, "completion_id")
    assert error["code"] == "completion_not_found"
    known = chat(client)["id"]
    error = assert_error(_implicit(client, known, choice_index=3), 404, "choice_index")
    assert error["code"] == "choice_not_found"
    assert _rows(store) == []


def test_bad_signals_are_400(client: TestClient, store: Store) -> None:
    known = chat(client)["id"]
    for bad in ("thumbs", "", "REGENERATE", 3, None):
        assert_error(_implicit(client, known, bad), 400, "signal")  # type: ignore[arg-type]
    assert_error(client.post("/v1/feedback/implicit", json={"completion_id": known}), 400,
                 "signal")
    assert _rows(store) == []


def test_only_the_key_that_got_the_answer_sends_signals(tmp_path: Path, db_url: str,
                                                        store: Store) -> None:
    settings = make_settings(tmp_path, db_url, api_keys="k1,k2", admin_key="root")
    app = create_app(settings, engine=FakeEngine(), store=store, watch=False)
    with TestClient(app) as keyed:
        answer = keyed.post("/v1/chat/completions", json=CHAT,
                            headers={"Authorization": "Bearer k1"}).json()
        other = _implicit(keyed, answer["id"], "copy", user="b",
                          headers={"Authorization": "Bearer k2"})
        assert assert_error(other, 403, "completion_id")["code"] == "not_your_completion"
        assert _implicit(keyed, answer["id"], headers={}).status_code == 401
        for key in ("k1", "root"):  # the key that received it, and the admin key
            response = _implicit(keyed, answer["id"], "copy", user="b",
                                 headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 201, response.text
    scopes = [scope for _, _, scope in _rows(store)]
    assert len(scopes) == 2 and scopes[0] is not None and scopes[0] != scopes[1]


def test_implicit_is_refused_from_another_origin(client: TestClient) -> None:
    known = chat(client)["id"]
    response = client.post("/v1/feedback/implicit", headers={"Origin": "https://evil.example"},
                           json={"completion_id": known, "signal": "copy"})
    assert response.status_code == 403
