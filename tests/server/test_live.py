"""Real sockets: 200 concurrent feedback posts; the `openai` SDK against `flywheel serve`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest

from feedback_store import Store
from server.app import create_app
from server.engines.fake import FakeEngine
from tests.helpers import feedback_counts
from tests.server.conftest import ThreadServer, free_port, make_settings


@pytest.mark.slow
def test_200_concurrent_feedback_posts(tmp_path: Path, db_url: str, store: Store) -> None:
    settings = make_settings(tmp_path, db_url)
    app = create_app(settings, engine=FakeEngine(), store=store, watch=False)
    with ThreadServer(app, free_port()) as server:
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 4}
        completion = httpx.post(server.url + "/v1/chat/completions", json=chat).json()

        async def post_all() -> list[int]:
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(base_url=server.url, limits=limits,
                                         timeout=60) as client:
                posts = [client.post("/v1/feedback", json={
                    "completion_id": completion["id"], "choice_index": i % 4,
                    "rating": "up" if i % 3 else "down", "user": f"user-{i}",
                }) for i in range(200)]
                return [r.status_code for r in await asyncio.gather(*posts)]

        statuses = asyncio.run(post_all())
    assert statuses == [201] * 200
    counts = feedback_counts(store)
    assert counts["up"] + counts["down"] == 200
    assert counts["down"] == len([i for i in range(200) if i % 3 == 0])


@pytest.mark.slow
def test_openai_sdk_against_live_server(live_server: str) -> None:
    client = openai.OpenAI(base_url=live_server + "/v1", api_key="unused")
    models = client.models.list()
    assert [m.id for m in models.data] == ["flywheel"]

    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    plain = client.chat.completions.create(model="flywheel", messages=messages, max_tokens=16)
    assert plain.id.startswith("chatcmpl-")
    assert plain.system_fingerprint == "policy-0"
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage is not None and plain.usage.completion_tokens > 0

    stream = client.chat.completions.create(model="flywheel", messages=messages, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all(c.system_fingerprint == "policy-0" for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens >= 1 and isinstance(streamed, str)

    three = client.chat.completions.create(model="flywheel", messages=messages, max_tokens=12,
                                           n=3, seed=5, logprobs=True)
    assert sorted(c.index for c in three.choices) == [0, 1, 2]
    assert all(c.logprobs is not None and c.logprobs.content for c in three.choices)

    text = client.completions.create(model="flywheel", prompt="Hello", max_tokens=5)
    assert text.object == "text_completion"
    assert text.choices[0].finish_reason in ("stop", "length")

    feedback = httpx.post(live_server + "/v1/feedback",
                          json={"completion_id": three.id, "choice_index": 2, "rating": "up"})
    assert feedback.status_code == 201
    ranking = httpx.post(live_server + "/v1/rankings",
                         json={"completion_id": three.id, "ranking": [1, 0, 2]})
    assert ranking.status_code == 201
    export = httpx.get(live_server + "/v1/feedback/export").text
    assert three.id not in export  # export carries content, not ids
    assert export.count('"chosen"') == 3

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="flywheel", messages=[], max_tokens=4)
    assert info.value.status_code == 400
