"""Canaries on the vLLM engine, against the stand-in: a second adapter, or a second engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.engines.base import ChoiceDelta, SamplingParams, SwapError
from server.engines.vllm_engine import VLLMEngine
from tests.server.vllm_standin import (
    StandInAsyncLLM,
    StandInLoRARequest,
    StandInTokenizer,
    bindings,
    hf_dir,
    lora_dir,
    settings_for,
)

PARAMS = SamplingParams(max_tokens=8, n=2)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return hf_dir(tmp_path / "base")


async def started(tmp_path: Path, llm: StandInAsyncLLM, *, use_lora: bool = False,
                  spares: list[StandInAsyncLLM] | None = None,
                  built: list[dict] | None = None) -> VLLMEngine:
    engine = VLLMEngine(settings_for(tmp_path, use_lora), bindings=bindings(llm, built, spares),
                        tokenizer=StandInTokenizer())
    await engine.start()
    llm.calls.clear()
    return engine


async def ask(engine: VLLMEngine, canary: bool, request_id: str = "r") -> list[ChoiceDelta]:
    return [d async for d in engine.generate([1, 65], PARAMS, request_id, canary=canary)]


def versions(deltas: list[ChoiceDelta]) -> set[str]:
    return {d.policy_version for d in deltas}


def adapter(path: Path, version: str, lora_id: int) -> StandInLoRARequest:
    return StandInLoRARequest(version, lora_id, str(path / "adapter"))


# -- LoRA canaries: a second adapter in the same engine ------------------------------------------


async def test_lora_canary_is_a_second_adapter_served_per_request(
        tmp_path: Path, base: Path) -> None:
    llm = StandInAsyncLLM()
    engine = await started(tmp_path, llm, use_lora=True)
    policy1 = lora_dir(tmp_path / "policy-1")
    await engine.set_canary(str(policy1), "policy-1")
    assert llm.calls == [("add_lora", adapter(policy1, "policy-1", 1))]  # no pause, no reload
    assert engine.canary_version == "policy-1" and engine.policy_version == "policy-0"
    results = await asyncio.gather(*(ask(engine, canary=i % 2 == 1, request_id=f"r{i}")
                                     for i in range(4)))
    for i, deltas in enumerate(results):
        assert versions(deltas) == {"policy-1" if i % 2 else "policy-0"}
    by_id = {r["request_id"]: r["lora"] for r in llm.requests}
    assert by_id == {"r0": None, "r1": adapter(policy1, "policy-1", 1), "r2": None,
                     "r3": adapter(policy1, "policy-1", 1)}
    extra = engine.stats().extra
    assert extra["canary_version"] == "policy-1" and extra["canary_lora"] == "policy-1"
    assert extra["requests_by_version"] == {"policy-0": 0, "policy-1": 0}


async def test_lora_canary_promotion_reuses_the_adapter(tmp_path: Path, base: Path) -> None:
    llm = StandInAsyncLLM()
    engine = await started(tmp_path, llm, use_lora=True)
    policy1 = lora_dir(tmp_path / "policy-1")
    await engine.set_canary(str(policy1), "policy-1")
    llm.calls.clear()
    await engine.swap_weights(str(policy1), "policy-1")
    assert llm.calls == []  # nothing loaded, nothing paused
    assert engine.policy_version == "policy-1" and engine.canary_version is None
    for canary in (False, True):
        assert versions(await ask(engine, canary)) == {"policy-1"}
        assert llm.requests[-1]["lora"] == adapter(policy1, "policy-1", 1)


async def test_lora_canary_replaced_and_ended_with_requests_in_flight(
        tmp_path: Path, base: Path) -> None:
    llm = StandInAsyncLLM()
    engine = await started(tmp_path, llm, use_lora=True)
    policy1, policy2 = lora_dir(tmp_path / "policy-1"), lora_dir(tmp_path / "policy-2")
    await engine.set_canary(str(policy1), "policy-1")
    llm.hold_stream = asyncio.Event()
    on_first = asyncio.create_task(ask(engine, True, "on-1"))
    await asyncio.sleep(0.01)
    await engine.set_canary(str(policy2), "policy-2")
    on_second = asyncio.create_task(ask(engine, True, "on-2"))
    await asyncio.sleep(0.01)
    assert engine.stats().extra["requests_by_version"] == {
        "policy-0": 0, "policy-1": 1, "policy-2": 1}
    await engine.end_canary()
    assert engine.canary_version is None
    llm.hold_stream.set()
    late = await ask(engine, True, "late")
    results = await asyncio.gather(on_first, on_second, return_exceptions=True)
    assert [versions(r) for r in results] == [{"policy-1"}, {"policy-2"}]  # type: ignore[arg-type]
    assert versions(late) == {"policy-0"} and llm.requests[-1]["lora"] is None
    assert [r["lora"].lora_name for r in llm.requests[:2]] == ["policy-1", "policy-2"]


async def test_failed_lora_canary_changes_nothing(tmp_path: Path, base: Path) -> None:
    llm = StandInAsyncLLM()
    engine = await started(tmp_path, llm, use_lora=True)
    await engine.set_canary(str(lora_dir(tmp_path / "policy-1")), "policy-1")
    llm.fail.add("add_lora")
    with pytest.raises(SwapError, match="adapter"):
        await engine.set_canary(str(lora_dir(tmp_path / "policy-2")), "policy-2")
    assert engine.canary_version == "policy-1"
    await ask(engine, True)
    assert llm.requests[-1]["lora"].lora_name == "policy-1"
    with pytest.raises(SwapError, match="active"):
        await engine.set_canary(str(tmp_path / "policy-1"), "policy-0")


async def test_lora_canary_needs_the_base_weights_and_ends_on_a_full_swap(
        tmp_path: Path, base: Path) -> None:
    llm = StandInAsyncLLM()
    engine = await started(tmp_path, llm, use_lora=True)
    await engine.set_canary(str(lora_dir(tmp_path / "policy-1")), "policy-1")
    await engine.swap_weights(str(hf_dir(tmp_path / "policy-2")), "policy-2")
    assert engine.canary_version is None  # the adapter was trained on the weights just replaced
    assert versions(await ask(engine, True)) == {"policy-2"}
    llm.calls.clear()
    with pytest.raises(SwapError, match="base weights"):
        await engine.set_canary(str(lora_dir(tmp_path / "policy-3")), "policy-3")
    assert llm.calls == [] and engine.canary_version is None


# -- full-weight canaries: a second engine --------------------------------------------------------


async def test_full_weight_canary_runs_on_a_second_engine(tmp_path: Path, base: Path) -> None:
    llm, spare, built = StandInAsyncLLM(), StandInAsyncLLM(), []
    engine = await started(tmp_path, llm, spares=[spare], built=built)
    policy1 = hf_dir(tmp_path / "policy-1")
    await engine.set_canary(str(policy1), "policy-1")
    assert built[1]["model"] == str(policy1) and built[1]["tokenizer"] == str(base)
    assert built[1]["gpu_memory_utilization"] == pytest.approx(0.10)  # beside the default 0.85
    assert spare.calls == [("version", "policy-1")] and llm.calls == []  # the main one not paused
    active, canary = await asyncio.gather(ask(engine, False, "a"), ask(engine, True, "c"))
    assert versions(active) == {"policy-0"} and versions(canary) == {"policy-1"}
    assert [r["request_id"] for r in llm.requests] == ["a"]
    assert [r["request_id"] for r in spare.requests] == ["c"]
    assert engine.stats().extra["canary_weights_path"] == str(policy1)
    await engine.stop()
    assert ("shutdown",) in spare.calls and ("shutdown",) in llm.calls


async def test_full_weight_canary_refused_changes_nothing(tmp_path: Path, base: Path) -> None:
    llm, built = StandInAsyncLLM(), []
    engine = await started(tmp_path, llm, built=built)
    with pytest.raises(SwapError, match="hidden_size"):
        await engine.set_canary(str(hf_dir(tmp_path / "p1", hidden_size=32)), "policy-1")
    broken = hf_dir(tmp_path / "p2")
    llm.failing_paths.add(str(broken))
    with pytest.raises(SwapError, match="could not start"):
        await engine.set_canary(str(broken), "policy-2")
    assert len(built) == 2 and llm.calls == []  # the shape check refused before building
    assert engine.canary_version is None and versions(await ask(engine, True)) == {"policy-0"}


async def test_full_weight_canary_ended_in_flight_then_shut_down(
        tmp_path: Path, base: Path) -> None:
    llm, spare = StandInAsyncLLM(), StandInAsyncLLM(hold_stream=asyncio.Event())
    engine = await started(tmp_path, llm, spares=[spare])
    await engine.set_canary(str(hf_dir(tmp_path / "policy-1")), "policy-1")
    running = [asyncio.create_task(ask(engine, True, f"c{i}")) for i in range(3)]
    await asyncio.sleep(0.01)
    await engine.end_canary()
    assert versions(await ask(engine, True, "late")) == {"policy-0"}
    assert ("shutdown",) not in spare.calls and engine.stats().extra["retiring_engines"] == 1
    assert spare.hold_stream is not None
    spare.hold_stream.set()
    results = await asyncio.gather(*running, return_exceptions=True)
    assert [versions(r) for r in results] == [{"policy-1"}] * 3  # type: ignore[arg-type]
    assert spare.calls[-1] == ("shutdown",) and engine.stats().extra["retiring_engines"] == 0


async def test_full_weight_canary_promotion_and_replacement(tmp_path: Path, base: Path) -> None:
    llm, first, second = StandInAsyncLLM(), StandInAsyncLLM(), StandInAsyncLLM()
    engine = await started(tmp_path, llm, spares=[first, second])
    await engine.set_canary(str(hf_dir(tmp_path / "policy-1")), "policy-1")
    policy2 = hf_dir(tmp_path / "policy-2")
    await engine.set_canary(str(policy2), "policy-2")  # replaces: the idle first one shuts down
    assert first.calls[-1] == ("shutdown",)
    llm.hold_stream = asyncio.Event()
    old = asyncio.create_task(ask(engine, False, "old"))
    await asyncio.sleep(0.01)
    await engine.swap_weights(str(policy2), "policy-2")
    assert llm.calls == [] and second.calls == [("version", "policy-2")]  # no reload anywhere
    assert engine.policy_version == "policy-2" and engine.canary_version is None
    for canary in (False, True):
        assert versions(await ask(engine, canary, f"new-{canary}")) == {"policy-2"}
    assert [r["request_id"] for r in second.requests] == ["new-False", "new-True"]
    assert engine.stats().extra["weights_path"] == str(policy2)
    llm.hold_stream.set()
    assert versions(await old) == {"policy-0"}
    assert llm.calls[-1] == ("shutdown",)  # the old main engine drained and was shut down
