"""The transformers engine in its own process: the same contract as in-process, and a dead
engine process fails its requests, readiness and the server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

from feedback_store import Store
from server.app import create_app
from server.engines.base import (
    Engine,
    EngineError,
    PromptTooLongError,
    SamplingParams,
    SwapError,
)
from server.engines.engine_process import TransformersProcessEngine
from tests.server.conftest import free_port, make_settings, spawn_server, stop_server, wait_ready
from tests.server.test_engine_canary import corrupt_copy, rest, started_stream, until
from tests.server.test_transformers_engine import (
    QUESTIONS,
    chat,
    collect,
    greedy_reference,
    perturbed_checkpoint,
)

pytestmark = pytest.mark.slow
LONG = SamplingParams(max_tokens=300, temperature=0.0)  # with ignore_eos: outlasts a weight load


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[TransformersProcessEngine]:
    eng = TransformersProcessEngine(str(tiny_model_dir), device="cpu", max_batch_size=16)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.stop())


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("process-policies")
    torch.manual_seed(2)
    return {"policy-1": perturbed_checkpoint(tiny_model_dir, root / "policy-1"),
            "policy-2": perturbed_checkpoint(tiny_model_dir, root / "policy-2"),
            "bad": corrupt_copy(tiny_model_dir, root / "bad", "nan")}


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_it_keeps_the_engine_protocol(engine: TransformersProcessEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.policy_version == "policy-0" and engine.canary_version is None
    assert engine.stats().extra["engine_process"] != os.getpid()


async def test_greedy_streams_equal_the_reference(engine: TransformersProcessEngine,
                                                  tiny_model_dir: Path) -> None:
    model = load(tiny_model_dir)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, top_logprobs=2)
    prompts = [chat(engine, q) for q in QUESTIONS]
    results = await asyncio.gather(*(collect(engine, p, greedy, f"g{i}")
                                     for i, p in enumerate(prompts)))
    for prompt, result in zip(prompts, results, strict=True):
        choice = result[0]
        assert choice["ids"] == greedy_reference(model, prompt, 24, engine.eos_token_ids)
        assert choice["versions"] == {"policy-0"} and choice["finish"] in ("stop", "length")
        assert len(choice["lps"]) == len(choice["tops"]) == len(choice["ids"])
        assert choice["text"] == engine.decode([t for t in choice["ids"]
                                                if t not in engine.eos_token_ids])
    assert engine.stats().running == 0 and engine.stats().waiting == 0


async def test_n_choices_are_distinct_and_seeded(engine: TransformersProcessEngine) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=5)
    result = await collect(engine, chat(engine, "Hello!"), params)
    assert sorted(result) == [0, 1, 2]
    assert len({tuple(c["ids"]) for c in result.values()}) > 1
    again = await collect(engine, chat(engine, "Hello!"), params)
    assert [result[i]["ids"] for i in range(3)] == [again[i]["ids"] for i in range(3)]


async def test_many_concurrent_requests_all_complete(engine: TransformersProcessEngine) -> None:
    params = [SamplingParams(max_tokens=4 + i % 9, temperature=(i % 3) / 2, n=1 + i % 2)
              for i in range(40)]
    results = await asyncio.gather(*(collect(engine, chat(engine, QUESTIONS[i % 6]), p, f"c{i}")
                                     for i, p in enumerate(params)))
    for p, result in zip(params, results, strict=True):
        assert sorted(result) == list(range(p.n))
        for choice in result.values():
            assert choice["finish"] in ("stop", "length")
            assert 1 <= len(choice["ids"]) <= p.max_tokens
    assert engine.stats().running == 0


def test_bad_prompts_are_refused_before_streaming(engine: TransformersProcessEngine) -> None:
    with pytest.raises(PromptTooLongError):
        engine.generate([1] * engine.max_model_len, SamplingParams(max_tokens=4), "long")
    with pytest.raises(EngineError):
        engine.generate([10**9], SamplingParams(max_tokens=4), "vocab")
    with pytest.raises(EngineError):
        engine.generate([], SamplingParams(max_tokens=4), "empty")


async def test_swap_under_in_flight_requests(tiny_model_dir: Path,
                                             checkpoints: dict[str, Path]) -> None:
    eng = TransformersProcessEngine(str(tiny_model_dir), device="cpu", ignore_eos=True)
    await eng.start()
    try:
        running = [await started_stream(eng, LONG, f"old{i}") for i in range(4)]
        late = [asyncio.create_task(collect(eng, chat(eng, q), SamplingParams(max_tokens=8),
                                            f"late{i}")) for i, q in enumerate(QUESTIONS)]
        await eng.swap_weights(str(checkpoints["policy-1"]), "policy-1")
        assert eng.policy_version == "policy-1"
        after = await collect(eng, chat(eng, "Hello!"), SamplingParams(max_tokens=5), "after")
        assert after[0]["versions"] == {"policy-1"}
        finished = await asyncio.gather(*(rest(*r) for r in running))
        for deltas in finished:  # all finished, on the weights they started with
            assert {d.policy_version for d in deltas} == {"policy-0"}
            assert sum(len(d.token_ids) for d in deltas) == LONG.max_tokens
        for result in await asyncio.gather(*late):  # 0 failed, each labelled with one version
            assert len(result[0]["versions"]) == 1 and result[0]["finish"] == "length"
        await until(lambda: eng.stats().extra["policy_versions"] == ["policy-1"])

        for bad in (checkpoints["bad"], tiny_model_dir / "missing"):
            with pytest.raises(SwapError):
                await eng.swap_weights(str(bad), "policy-9")
        assert eng.policy_version == "policy-1"
        still = await collect(eng, chat(eng, "Hello!"), SamplingParams(max_tokens=5), "still")
        assert still[0]["versions"] == {"policy-1"} and still[0]["finish"] == "length"
    finally:
        await eng.stop()


async def test_canary_beside_the_active_version(tiny_model_dir: Path,
                                                checkpoints: dict[str, Path]) -> None:
    eng = TransformersProcessEngine(str(tiny_model_dir), device="cpu", ignore_eos=True)
    await eng.start()
    try:
        with pytest.raises(SwapError):
            await eng.set_canary(str(checkpoints["bad"]), "policy-9")
        assert eng.canary_version is None and eng.stats().extra["policy_versions"] == ["policy-0"]
        await eng.set_canary(str(checkpoints["policy-1"]), "policy-1")
        assert eng.canary_version == "policy-1"
        greedy = SamplingParams(max_tokens=10, temperature=0.0)
        prompt = chat(eng, "What is 7 plus 5?")
        for canary, path in ((False, tiny_model_dir), (True, checkpoints["policy-1"])):
            out = [d async for d in eng.generate(prompt, greedy, "arm", canary=canary)]
            assert {d.policy_version for d in out} == {"policy-1" if canary else "policy-0"}
            ids = [t for d in out for t in d.token_ids]
            assert ids == greedy_reference(load(path), prompt, 10, ())

        on_canary = await started_stream(eng, LONG, "on-1", canary=True)
        await eng.set_canary(str(checkpoints["policy-2"]), "policy-2")  # replaces policy-1
        assert eng.stats().extra["policy_versions"] == ["policy-0", "policy-1", "policy-2"]
        assert {d.policy_version for d in await rest(*on_canary)} == {"policy-1"}
        await until(lambda: eng.stats().extra["policy_versions"] == ["policy-0", "policy-2"])

        await eng.swap_weights("/never/read", "policy-2")  # promotion: no load
        assert eng.policy_version == "policy-2" and eng.canary_version is None
        await eng.set_canary(str(checkpoints["policy-1"]), "policy-1")
        running = await started_stream(eng, LONG, "ending", canary=True)
        await eng.end_canary()
        assert eng.canary_version is None
        late = [d async for d in eng.generate(prompt, greedy, "late", canary=True)]
        assert {d.policy_version for d in late} == {"policy-2"}
        assert {d.policy_version for d in await rest(*running)} == {"policy-1"}
        await until(lambda: eng.stats().extra["policy_versions"] == ["policy-2"])
    finally:
        await eng.stop()


async def test_stop_aborts_what_cannot_finish(tiny_model_dir: Path) -> None:
    eng = TransformersProcessEngine(str(tiny_model_dir), device="cpu", ignore_eos=True)
    await eng.start()
    _, stream = await started_stream(eng, SamplingParams(max_tokens=450), "endless")
    await eng.stop(drain_timeout_s=0.0)
    with pytest.raises(EngineError):
        async for _ in stream:
            pass
    with pytest.raises(EngineError):
        eng.generate(chat(eng, "Hello!"), SamplingParams(max_tokens=4), "late")
    assert eng.stats().extra["degraded"] is None  # a stop is no death


def test_a_killed_engine_process_fails_requests_and_readiness(
        tiny_model_dir: Path, tmp_path: Path, sqlite_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.engines.core_death.DEATH_POLL_SECONDS", 0.01)
    eng = TransformersProcessEngine(str(tiny_model_dir), device="cpu", ignore_eos=True)
    deaths: list[bool] = []
    eng.on_death = lambda: deaths.append(True)  # type: ignore[method-assign]
    store = Store(sqlite_url)
    store.upgrade()
    app = create_app(make_settings(tmp_path, sqlite_url), engine=eng, store=store, watch=False)
    body = {"model": "flywheel", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 400, "stream": True}
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            assert client.get("/readyz").status_code == 200
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                os.kill(eng.pid, signal.SIGKILL)
                rest_of_stream = "\n".join(lines)  # ends: the request failed, no hang
            assert '"error"' in rest_of_stream
            assert client.get("/readyz").status_code == 503
            refused = client.post("/v1/chat/completions", json={**body, "stream": False})
            assert refused.status_code >= 500
            client.portal.call(until, lambda: bool(deaths))  # type: ignore[union-attr]
        assert eng.stats().extra["dead"]
    finally:
        store.close()


def test_the_server_exits_when_its_engine_process_dies(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = spawn_server({"FLYWHEEL_MODEL": str(tiny_model_dir), "FLYWHEEL_DATA_DIR": str(tmp_path),
                         "FLYWHEEL_DATABASE_URL": f"sqlite:///{tmp_path / 'd.db'}",
                         "FLYWHEEL_ENGINE_PROCESS": "true"}, port, tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        reply = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "flywheel", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        (core,) = psutil.Process(proc.pid).children()
        core.kill()
        assert proc.wait(timeout=60) == 1
    except subprocess.TimeoutExpired:
        raise AssertionError("the server did not exit") from None
    finally:
        stop_server(proc)


async def test_create_engine_builds_it_by_default_on_cpu(tiny_model_dir: Path) -> None:
    from flywheel.settings import Settings
    from server.engines import create_engine, own_process

    assert not own_process(Settings(device="cpu", engine_process=False))
    assert not own_process(Settings(device="cuda"))  # unmeasured on GPU: in-process
    # Told without torch where its build has no GPU, the same answer as torch's.
    assert own_process(Settings(device="auto", engine_process=None)) == (
        not torch.cuda.is_available())
    settings = Settings(model=str(tiny_model_dir), device="cpu")
    eng = create_engine(settings, policy_version="policy-7")
    try:
        assert isinstance(eng, TransformersProcessEngine) and isinstance(eng, Engine)
        assert eng.policy_version == "policy-7" and eng.max_model_len == 512
    finally:
        await eng.stop()


API_SIDE = """
import sys
from fastapi.testclient import TestClient
from flywheel.settings import Settings
from server.app import create_app

model, data = sys.argv[1], sys.argv[2]
settings = Settings(model=model, device="cpu", engine_process=None, data_dir=data,
                    database_url=f"sqlite:///{data}/api.db", redis_url="", api_keys="")
with TestClient(create_app(settings, watch=False)) as client:
    body = {"model": "flywheel", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8, "stream": True, "seed": 3, "temperature": 1.0}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200 and "[DONE]" in response.read().decode()
    print(type(client.app.state.flywheel.engine).__name__)
print(sorted(name for name in sys.modules if name.split(".")[0] == "torch"))
"""


def test_the_api_process_never_imports_torch(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The API process of this mode (the default on CPU) serves without torch: it would cost
    each replica about 240 MiB. A fresh interpreter, as ``flywheel serve`` starts."""
    done = subprocess.run([sys.executable, "-c", API_SIDE, str(tiny_model_dir), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["TransformersProcessEngine", "[]"]


def test_the_engine_process_ends_with_its_api_process(tiny_model_dir: Path) -> None:
    """Killed outright, the API process leaves no engine process behind (its pipe closes)."""
    code = ("import sys, time; from server.engines.engine_process import TransformersProcessEngine;"
            f" e = TransformersProcessEngine({str(tiny_model_dir)!r}, device='cpu');"
            " print(e.pid, flush=True); time.sleep(600)")
    api = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert api.stdout is not None
        core = psutil.Process(int(api.stdout.readline()))
        api.kill()
        gone, alive = psutil.wait_procs([core], timeout=60)
        assert gone and not alive
    finally:
        api.kill()
        api.wait()


def test_a_model_it_cannot_load_is_one_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = corrupt_copy(tiny_model_dir, tmp_path / "broken", "truncated")
    with pytest.raises(EngineError, match="could not load"):
        TransformersProcessEngine(str(broken), device="cpu")
