"""Two policy versions at once, the active one and a canary: transformers and fake engines."""

from __future__ import annotations

import asyncio
import gc
import shutil
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import torch

from server.engines.base import ChoiceDelta, Engine, SamplingParams, SwapError
from server.engines.fake import FakeEngine
from tests.server.test_transformers_engine import (
    chat,
    greedy_reference,
    perturbed_checkpoint,
)

QUESTIONS = ["What is 7 plus 5?", "Hello!", "What is the capital of France?"]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)
LONG = SamplingParams(max_tokens=300, temperature=0.0)  # with ignore_eos: outlasts any change


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("canaries")
    torch.manual_seed(1)
    return {"policy-1": perturbed_checkpoint(tiny_model_dir, root / "policy-1"),
            "policy-2": perturbed_checkpoint(tiny_model_dir, root / "policy-2")}


async def engine_on(model_dir: Path, **kwargs: object) -> Engine:
    from server.engines.transformers_engine import TransformersEngine

    eng = TransformersEngine(str(model_dir), device="cpu", max_batch_size=16, **kwargs)  # type: ignore[arg-type]
    await eng.start()
    return eng


async def ask(engine: Engine, question: str, params: SamplingParams, request_id: str,
              canary: bool) -> dict:
    """One request's single choice, concatenated (as ``collect`` does), on the arm asked for."""
    out: dict = {"ids": [], "versions": set(), "finish": None}
    async for d in engine.generate(chat(engine, question), params, request_id, canary=canary):
        out["ids"] += d.token_ids
        out["versions"].add(d.policy_version)
        out["finish"] = d.finish_reason
    return out


async def started_stream(engine: Engine, params: SamplingParams, request_id: str,
                         canary: bool = False) -> tuple[ChoiceDelta, AsyncIterator[ChoiceDelta]]:
    """A request that has produced its first delta (it is running, not waiting)."""
    stream = engine.generate(chat(engine, "Hello!"), params, request_id, canary=canary)
    return await anext(stream), stream


async def rest(first: ChoiceDelta, stream: AsyncIterator[ChoiceDelta]) -> list[ChoiceDelta]:
    return [first] + [d async for d in stream]


async def until(condition: Callable[[], bool]) -> None:
    """Wait for the engine to catch up (drained groups are freed after their last step; an
    engine process reports what it did after a stream ended)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


@pytest.mark.slow
async def test_canary_and_active_serve_concurrently_on_their_own_weights(
        tiny_model_dir: Path, checkpoints: dict[str, Path]) -> None:
    eng = await engine_on(tiny_model_dir)
    try:
        assert eng.canary_version is None
        await eng.set_canary(str(checkpoints["policy-1"]), "policy-1")
        assert eng.canary_version == "policy-1" and eng.policy_version == "policy-0"
        assert eng.stats().extra["policy_versions"] == ["policy-0", "policy-1"]
        arms = [(q, canary) for q in QUESTIONS for canary in (False, True)]
        results = await asyncio.gather(*(ask(eng, q, GREEDY, f"r{i}", canary)
                                         for i, (q, canary) in enumerate(arms)))
        for (question, canary), result in zip(arms, results, strict=True):
            model = eng.canary_model if canary else eng.model  # type: ignore[attr-defined]
            assert result["versions"] == {"policy-1" if canary else "policy-0"}
            assert result["ids"] == greedy_reference(model, chat(eng, question), 16,
                                                     eng.eos_token_ids)
        assert [r["ids"] for r in results[0::2]] != [r["ids"] for r in results[1::2]]
        stats = eng.stats().extra
        assert stats["canary_version"] == "policy-1" and stats["active_version"] == "policy-0"
        assert stats["requests_by_version"] == {"policy-0": 0, "policy-1": 0}
    finally:
        await eng.stop()


def corrupt_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    if how == "truncated":
        weights = dst / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:  # weights that load but produce NaN logits
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src)
        with torch.no_grad():
            next(iter(model.parameters())).fill_(float("nan"))
        model.save_pretrained(dst)
    return dst


@pytest.mark.slow
async def test_a_corrupt_canary_is_refused_and_nothing_changes(
        tiny_model_dir: Path, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    eng = await engine_on(tiny_model_dir)
    bad = [corrupt_copy(tiny_model_dir, tmp_path / how, how) for how in ("truncated", "nan")]
    try:
        for path in [*bad, tmp_path / "missing"]:
            with pytest.raises(SwapError):
                await eng.set_canary(str(path), "policy-9")
            assert eng.canary_version is None
            assert eng.stats().extra["policy_versions"] == ["policy-0"]
        with pytest.raises(SwapError, match="active"):
            await eng.set_canary(str(checkpoints["policy-1"]), "policy-0")

        await eng.set_canary(str(checkpoints["policy-1"]), "policy-1")
        loaded = eng.canary_model  # type: ignore[attr-defined]
        with pytest.raises(SwapError):
            await eng.set_canary(str(bad[0]), "policy-2")
        assert eng.canary_version == "policy-1" and eng.canary_model is loaded  # type: ignore[attr-defined]
        result = await ask(eng, "Hello!", SamplingParams(max_tokens=4), "after", canary=True)
        assert result["versions"] == {"policy-1"}
    finally:
        await eng.stop()


@pytest.mark.slow
async def test_end_canary_lets_running_requests_finish_on_it(
        tiny_model_dir: Path, checkpoints: dict[str, Path]) -> None:
    eng = await engine_on(tiny_model_dir, ignore_eos=True)
    try:
        await eng.set_canary(str(checkpoints["policy-1"]), "policy-1")
        canary_weights = weakref.ref(eng.canary_model)  # type: ignore[attr-defined]
        running = [await started_stream(eng, LONG, f"c{i}", canary=i % 2 == 0) for i in range(4)]
        assert eng.stats().extra["requests_by_version"] == {"policy-0": 2, "policy-1": 2}
        await eng.end_canary()
        assert eng.canary_version is None
        late = await ask(eng, "Hello!", SamplingParams(max_tokens=4), "late", canary=True)
        assert late["versions"] == {"policy-0"}  # new canary requests go to the active one
        finished = await asyncio.gather(*(rest(*r) for r in running), return_exceptions=True)
        for i, deltas in enumerate(finished):
            assert not isinstance(deltas, BaseException), deltas
            assert {d.policy_version for d in deltas} == {"policy-1" if i % 2 == 0 else "policy-0"}
            assert deltas[-1].finish_reason == "length"
            assert sum(len(d.token_ids) for d in deltas) == LONG.max_tokens
        await until(lambda: eng.stats().extra["policy_versions"] == ["policy-0"])
        gc.collect()
        assert canary_weights() is None  # the canary's weights are freed
        await eng.end_canary()  # no canary: nothing to do
    finally:
        await eng.stop()


@pytest.mark.slow
async def test_promoting_the_canary_reuses_its_loaded_weights(
        tiny_model_dir: Path, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    eng = await engine_on(tiny_model_dir, ignore_eos=True)
    try:
        await eng.set_canary(str(checkpoints["policy-1"]), "policy-1")
        canary_model = eng.canary_model  # type: ignore[attr-defined]
        old_active = await started_stream(eng, LONG, "old", canary=False)
        on_canary = await started_stream(eng, LONG, "canary", canary=True)
        # A path that does not exist: promotion must not read anything.
        await eng.swap_weights(str(tmp_path / "never-read"), "policy-1")
        assert eng.model is canary_model  # type: ignore[attr-defined]
        assert eng.policy_version == "policy-1" and eng.canary_version is None
        for canary in (False, True):
            new = await ask(eng, "Hello!", SamplingParams(max_tokens=4), "new", canary=canary)
            assert new["versions"] == {"policy-1"}
        assert {d.policy_version for d in await rest(*old_active)} == {"policy-0"}
        assert {d.policy_version for d in await rest(*on_canary)} == {"policy-1"}
        await until(lambda: eng.stats().extra["policy_versions"] == ["policy-1"])
        assert eng.stats().extra["canary_version"] is None
    finally:
        await eng.stop()


@pytest.mark.slow
async def test_set_canary_replaces_the_previous_canary(
        tiny_model_dir: Path, checkpoints: dict[str, Path]) -> None:
    eng = await engine_on(tiny_model_dir, ignore_eos=True)
    try:
        await eng.set_canary(str(checkpoints["policy-1"]), "policy-1")
        first = eng.canary_model  # type: ignore[attr-defined]
        await eng.set_canary(str(checkpoints["policy-1"]), "policy-1")  # already loaded: no-op
        assert eng.canary_model is first  # type: ignore[attr-defined]
        running = await started_stream(eng, LONG, "on-1", canary=True)
        await eng.set_canary(str(checkpoints["policy-2"]), "policy-2")
        assert eng.canary_version == "policy-2"
        assert eng.stats().extra["policy_versions"] == ["policy-0", "policy-1", "policy-2"]
        new = await ask(eng, "Hello!", SamplingParams(max_tokens=4), "on-2", canary=True)
        assert new["versions"] == {"policy-2"}
        assert {d.policy_version for d in await rest(*running)} == {"policy-1"}
        await until(lambda: eng.stats().extra["policy_versions"] == ["policy-0", "policy-2"])
    finally:
        await eng.stop()


# -- the fake engine keeps the same contract ----------------------------------------------------


async def fake_versions(engine: FakeEngine, canary: bool) -> set[str]:
    return {d.policy_version async for d in engine.generate([65], SamplingParams(max_tokens=3),
                                                             "f", canary=canary)}


async def test_fake_engine_canary_contract(tmp_path: Path) -> None:
    engine = FakeEngine()
    assert engine.canary_version is None and await fake_versions(engine, True) == {"policy-0"}
    with pytest.raises(SwapError):
        await engine.set_canary(str(tmp_path / "missing"), "policy-1")
    with pytest.raises(SwapError, match="active"):
        await engine.set_canary(str(tmp_path), "policy-0")
    assert engine.canary_version is None and engine.loads == []

    await engine.set_canary(str(tmp_path), "policy-1")
    assert await fake_versions(engine, True) == {"policy-1"}
    assert await fake_versions(engine, False) == {"policy-0"}
    running = engine.generate([65], SamplingParams(max_tokens=20), "in-flight", canary=True)
    first = await anext(running)
    assert engine.stats().extra["requests_by_version"] == {"policy-0": 0, "policy-1": 1}
    await engine.end_canary()
    assert await fake_versions(engine, True) == {"policy-0"}
    assert {d.policy_version for d in await rest(first, running)} == {"policy-1"}
    assert engine.stats().extra["requests_by_version"] == {"policy-0": 0}

    await engine.set_canary(str(tmp_path), "policy-1")
    await engine.set_canary(str(tmp_path), "policy-2")  # replaces it
    assert engine.canary_version == "policy-2"
    loads = len(engine.loads)
    await engine.swap_weights(str(tmp_path / "never-read"), "policy-2")  # promotion: no load
    assert len(engine.loads) == loads and engine.swaps[-1][1] == "policy-2"
    assert engine.policy_version == "policy-2" and engine.canary_version is None
    assert await fake_versions(engine, True) == {"policy-2"}
