"""One client cannot lock the others out: each key (each address without keys) has a share of
the queue and of the batch, the scheduler takes keys in turn, and a request's cost is bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from feedback_store import Store
from server.app import create_app
from server.engines.base import ChoiceDelta, SamplingParams
from server.engines.fake import FakeEngine
from tests.server.conftest import live_app, make_settings


class HoldingEngine(FakeEngine):
    """Holds every request whose prompt starts with "flood" before its first token until
    ``release``: they stay waiting, as behind a busy batch; others are answered at once."""

    def __init__(self) -> None:
        super().__init__()
        self.held = 0
        self.gate: asyncio.Event | None = None

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, *, canary: bool = False,
                       tenant: str = "") -> AsyncIterator[ChoiceDelta]:
        if self.decode(prompt_token_ids).startswith("flood"):
            if self.gate is None:
                self.gate = asyncio.Event()
            self.held += 1
            await self.gate.wait()
        async for delta in super().generate(prompt_token_ids, params, request_id,
                                            canary=canary, tenant=tenant):
            yield delta


async def _flood_then_chat(url: str, flood: httpx.AsyncClient, other: httpx.AsyncClient,
                           engine: HoldingEngine, share: int) -> None:
    """``flood`` fills its share and is refused past it; ``other`` is still answered."""
    body = {"prompt": "flood", "max_tokens": 2}
    held = [asyncio.ensure_future(flood.post(url + "/v1/completions", json=body))
            for _ in range(share)]
    for _ in range(500):
        if engine.held == share:
            break
        await asyncio.sleep(0.01)
    assert engine.held == share, "the flood never reached the engine"
    refused = await flood.post(url + "/v1/completions", json=body)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "key_queue_full"
    assert int(refused.headers["Retry-After"]) >= 1
    chat = await other.post(url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert chat.status_code == 200, chat.text  # answered while the flood still waits
    assert not any(task.done() for task in held)
    assert engine.gate is not None
    engine.gate.set()
    assert [r.status_code for r in await asyncio.gather(*held)] == [200] * share


def test_a_flooding_key_gets_429_while_another_key_is_served(tmp_path: Path,
                                                              sqlite_store: Store) -> None:
    engine = HoldingEngine()
    # 8 waiting in all: a key alone may fill 7, one place is kept for a newcomer.
    with live_app(tmp_path, sqlite_store, engine, api_keys="key-a,key-b",
               max_waiting_requests=8) as server:
        async def run() -> None:
            async with httpx.AsyncClient(headers={"Authorization": "Bearer key-a"},
                                         timeout=30) as a, \
                    httpx.AsyncClient(headers={"Authorization": "Bearer key-b"},
                                      timeout=30) as b:
                await _flood_then_chat(server.url, a, b, engine, share=7)

        asyncio.run(run())


def test_without_keys_each_client_address_has_its_share(tmp_path: Path,
                                                         sqlite_store: Store) -> None:
    engine = HoldingEngine()
    with live_app(tmp_path, sqlite_store, engine, max_waiting_requests=6) as server:  # 5 each
        async def run() -> None:
            async with httpx.AsyncClient(timeout=30) as a, httpx.AsyncClient(
                    timeout=30,
                    transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2")) as b:
                await _flood_then_chat(server.url, a, b, engine, share=5)

        asyncio.run(run())


def test_a_fixed_share_per_key_and_fairness_off(tmp_path: Path, sqlite_store: Store) -> None:
    from server.shares import KeyShares

    shares = KeyShares(256, per_key=2)
    shares.enter("a")
    shares.enter("a")
    with pytest.raises(Exception, match="too many requests waiting"):
        shares.admit("a")
    shares.admit("b")
    shares.leave("a")
    shares.admit("a")
    default = KeyShares(256)
    assert default.share("a") == 224  # alone: all but the newcomers' eighth
    default.enter("a")
    assert default.share("b") == 112 and default.share("a") == 224
    off = KeyShares(2, enabled=False)
    for _ in range(5):
        off.enter("a")
    off.admit("a")  # only the global bound applies (``limits.admit``)


def test_a_request_past_the_cost_bound_is_400(tmp_path: Path, sqlite_store: Store) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'flywheel.db'}",
                             max_request_tokens=100)
    engine = FakeEngine()
    app = create_app(settings, engine=engine, store=sqlite_store, watch=False)
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app) as client:
        costly = client.post("/v1/chat/completions", json={**chat, "n": 4, "max_tokens": 30})
        assert costly.status_code == 400, costly.text
        error = costly.json()["error"]
        assert error["code"] == "request_too_costly" and error["param"] == "max_tokens"
        assert "120 tokens" in error["message"] and "100" in error["message"]
        newer = client.post("/v1/chat/completions",
                            json={**chat, "n": 4, "max_completion_tokens": 30})
        assert newer.json()["error"]["param"] == "max_completion_tokens"
        text = client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2,
                                                    "max_tokens": 20})
        assert text.status_code == 400
        assert "3 prompts x n=2 x max_tokens=20" in text.json()["error"]["message"]
        assert engine.running == {}  # nothing reached the engine
        # Within the bound, and a default max_tokens is kept within it rather than refused.
        assert client.post("/v1/chat/completions",
                           json={**chat, "n": 4, "max_tokens": 25}).status_code == 200
        default = client.post("/v1/chat/completions", json={**chat, "n": 4})
        assert default.status_code == 200
        assert default.json()["usage"]["completion_tokens"] <= 100


# -- the scheduler on the tiny model ------------------------------------------------------------


async def _first_token_order(engine, flood: int) -> list[str]:
    """Key "a" queues ``flood`` requests, then key "b" one: the order their first tokens came."""
    prompt = engine.encode_chat([{"role": "user", "content": "Hello!"}])
    order: list[str] = []

    async def one(tenant: str, i: int) -> None:
        stream = engine.generate(prompt, SamplingParams(max_tokens=24), f"{tenant}{i}",
                                 tenant=tenant)
        async for _ in stream:
            if f"{tenant}{i}" not in order:
                order.append(f"{tenant}{i}")

    tasks = [asyncio.ensure_future(one("a", i)) for i in range(flood)]
    await asyncio.sleep(0)  # every flood request is queued before b's
    tasks.append(asyncio.ensure_future(one("b", 0)))
    await asyncio.gather(*tasks)
    return order


@pytest.mark.slow
@pytest.mark.parametrize("own_process", [False, True], ids=["thread", "process"])
def test_the_scheduler_takes_another_keys_request_before_the_flood(
        tiny_model_dir: Path, own_process: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.engines.fair_queue import FairQueue
    from server.engines.transformers_engine import TransformersEngine

    taken: list[str] = []  # the order the scheduler took requests off the queue (thread only)
    take = FairQueue.take
    monkeypatch.setattr(FairQueue, "take",
                        lambda self, request: (taken.append(request.id), take(self, request))[1])
    orders, takes = {}, {}
    for fair in (True, False):
        engine = TransformersEngine(str(tiny_model_dir), device="cpu", max_batch_size=4,
                                    ignore_eos=True, own_process=own_process, fair_share=fair)

        async def run(engine: TransformersEngine = engine) -> list[str]:
            await engine.start()
            try:
                return await _first_token_order(engine, flood=12)
            finally:
                await engine.stop()

        taken.clear()
        orders[fair] = asyncio.run(run())
        takes[fair] = list(taken)
    # One FIFO queue: b's request waits behind all twelve. Fair: it is taken at the first free
    # row, so its first token comes with the second wave of four at the latest; the order of
    # first tokens within one prefill is the event loop's, not the scheduler's.
    assert orders[False].index("b0") == 12, orders[False]
    assert orders[True].index("b0") <= 7, orders[True]
    if not own_process:  # the scheduler is in this process: its own order, exactly
        assert takes[True].index("b0") <= 4, takes[True]
        assert takes[False].index("b0") == 12, takes[False]
