"""The transformers engine against the real tiny demo model: batching never changes results."""

from __future__ import annotations

import asyncio
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from server.engines.base import (
    ChoiceDelta,
    Engine,
    PromptTooLongError,
    SamplingParams,
    SwapError,
)
from server.engines.detokenize import StopMatcher
from server.engines.request import coalesce
from server.engines.sampling import inverse_cdf_sample, top_p_filter

QUESTIONS = [
    "What is 7 plus 5?", "Hello!", "Spell the word river.", "What is the capital of France?",
    "What is 9 minus 4?", "Good morning!",
]


# -- pure pieces --------------------------------------------------------------------------------


def test_stop_matcher_holds_back_possible_prefixes() -> None:
    matcher = StopMatcher(("STOP", "xy"))
    assert matcher.feed("abc S") == "abc "
    assert matcher.feed("T") == ""
    assert matcher.feed("Ox") == "STO"  # "STOx" can no longer become "STOP"; "x" may be "xy"
    assert not matcher.stopped
    assert matcher.feed("yz") == ""
    assert matcher.stopped
    other = StopMatcher(("STOP",))
    assert other.feed("ST") == ""
    assert other.feed("AR") == "STAR"
    assert other.feed("S") == ""
    assert other.flush() == "S"


def test_top_p_filter_matches_a_naive_loop() -> None:
    torch.manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(4, 11), dim=-1)
    top_p = torch.tensor([[0.5], [0.9], [1.0], [0.01]])
    out = top_p_filter(logprobs, top_p)
    for row in range(4):
        order = sorted(range(11), key=lambda t: -logprobs[row, t].item())
        kept, mass = [], 0.0
        for t in order:
            if kept and mass >= top_p[row, 0].item() and top_p[row, 0].item() < 1.0:
                break
            kept.append(t)
            mass += logprobs[row, t].exp().item()
        log_total = math.log(sum(logprobs[row, t].exp().item() for t in kept))
        for t in range(11):
            expected = logprobs[row, t].item() - log_total
            if t in kept:
                assert out[row, t].item() == pytest.approx(expected, abs=1e-5)
            else:
                assert out[row, t].item() == float("-inf")


def test_inverse_cdf_sample_never_picks_zero_mass_tokens() -> None:
    logprobs = torch.log(torch.tensor([[0.0, 0.5, 0.0, 0.5], [1.0, 0.0, 0.0, 0.0]]))
    for u in (0.0, 0.25, 0.4999, 0.5, 0.9999999):
        tokens = inverse_cdf_sample(logprobs, torch.tensor([u, u])).tolist()
        assert tokens[0] in (1, 3) and tokens[1] == 0


def test_coalesce_merges_per_choice_and_stops_at_errors() -> None:
    def delta(index: int, text: str, finish: str | None = None) -> ChoiceDelta:
        return ChoiceDelta(index, text, [len(text)], [-1.0], "policy-0", finish_reason=finish)  # type: ignore[arg-type]

    merged = coalesce([delta(0, "a"), delta(1, "b"), delta(0, "c", "stop"), RuntimeError("x"),
                       delta(1, "d")])
    assert [m.text for m in merged[:2]] == ["ac", "b"]  # type: ignore[union-attr]
    assert merged[0].finish_reason == "stop" and merged[0].token_ids == [1, 1]  # type: ignore[union-attr]
    assert isinstance(merged[2], RuntimeError) and len(merged) == 3


# -- the engine on the tiny model -------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    """One engine for the module: its decode thread serves whichever event loop a test runs."""
    from server.engines.transformers_engine import TransformersEngine

    eng = TransformersEngine(str(tiny_model_dir), device="cpu", max_batch_size=16)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.stop())


def chat(engine: Engine, question: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": question}])


async def collect(engine: Engine, prompt: list[int], params: SamplingParams,
                  request_id: str = "r") -> dict[int, dict]:
    """Every choice's concatenated deltas: text, token ids, logprobs, finish and version."""
    out: dict[int, dict] = {}
    async for d in engine.generate(prompt, params, request_id):
        c = out.setdefault(d.index, {"text": "", "ids": [], "lps": [], "tops": [], "deltas": 0,
                                     "versions": set(), "finish": None})
        c["text"] += d.text
        c["ids"] += d.token_ids
        c["lps"] += d.logprobs
        c["tops"] += d.top_logprobs or []
        c["deltas"] += 1
        c["versions"].add(d.policy_version)
        assert c["finish"] is None, "no delta after the final one"
        c["finish"] = d.finish_reason
    return out


def greedy_reference(model: torch.nn.Module, prompt: list[int], steps: int,
                     eos: tuple[int, ...]) -> list[int]:
    """Plain greedy decoding, recomputing the whole sequence every step (no cache, no batch)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in eos:
                break
    return ids[len(prompt):]


GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.mark.slow
async def test_greedy_batched_equals_one_at_a_time_and_reference(engine: Engine) -> None:
    prompts = [chat(engine, q) for q in QUESTIONS]
    alone = [(await collect(engine, p, GREEDY))[0] for p in prompts]
    together = await asyncio.gather(*(collect(engine, p, GREEDY, f"b{i}")
                                      for i, p in enumerate(prompts)))
    for prompt, a, b in zip(prompts, alone, together, strict=True):
        assert a["ids"] == b[0]["ids"] and a["text"] == b[0]["text"]
        reference = greedy_reference(engine.model, prompt, 24, engine.eos_token_ids)  # type: ignore[attr-defined]
        assert a["ids"] == reference


@pytest.mark.slow
async def test_seeded_sampling_is_reproducible_whatever_the_batch(engine: Engine) -> None:
    prompt = chat(engine, "What is the capital of France?")
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=1234)
    alone = (await collect(engine, prompt, seeded))[0]
    mates = [asyncio.create_task(collect(engine, chat(engine, q),
                                         SamplingParams(max_tokens=30, temperature=1.0), f"m{i}"))
             for i, q in enumerate(QUESTIONS)]
    await asyncio.sleep(0.05)  # the seeded request joins a batch that is already running
    crowded = (await collect(engine, prompt, seeded, "seeded"))[0]
    await asyncio.gather(*mates)
    assert crowded["ids"] == alone["ids"]
    other_seed = (await collect(engine, prompt, SamplingParams(max_tokens=20, seed=99)))[0]
    assert other_seed["ids"] != alone["ids"] or other_seed["finish"] == "stop"


def reference_logprobs(model: torch.nn.Module, prompt: list[int], ids: list[int],
                       temperature: float, top_p: float) -> list[float]:
    """Logprob of each generated token from one forward pass over the full sequence."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
    if temperature == 0.0:
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            logprobs = top_p_filter(logprobs, torch.full((len(ids), 1), top_p))
    return logprobs.gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()


@pytest.mark.slow
@pytest.mark.parametrize(("temperature", "top_p"), [(0.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
async def test_logprobs_equal_a_full_forward_pass(engine: Engine, temperature: float,
                                                 top_p: float) -> None:
    prompts = [chat(engine, q) for q in QUESTIONS[:4]]
    params = SamplingParams(max_tokens=16, temperature=temperature, top_p=top_p, top_logprobs=3,
                            seed=7)
    results = await asyncio.gather(*(collect(engine, p, params, f"l{i}")
                                     for i, p in enumerate(prompts)))
    for prompt, result in zip(prompts, results, strict=True):
        choice = result[0]
        expected = reference_logprobs(engine.model, prompt, choice["ids"], temperature, top_p)  # type: ignore[attr-defined]
        assert choice["lps"] == pytest.approx(expected, abs=1e-4)
        assert len(choice["tops"]) == len(choice["ids"])
        for top, lp in zip(choice["tops"], choice["lps"], strict=True):
            assert 1 <= len(top) <= 3 and max(top.values()) >= lp - 1e-5


@pytest.mark.slow
async def test_n_choices_share_one_prompt(engine: Engine) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=5)
    result = await collect(engine, chat(engine, "Hello!"), params)
    assert sorted(result) == [0, 1, 2]
    assert all(c["finish"] in ("stop", "length") and c["ids"] for c in result.values())
    assert len({tuple(c["ids"]) for c in result.values()}) > 1  # distinct samples
    again = await collect(engine, chat(engine, "Hello!"), params)
    for key in ("ids", "lps", "text", "finish"):  # seeded: reproducible
        assert [result[i][key] for i in range(3)] == [again[i][key] for i in range(3)]


@pytest.mark.slow
async def test_stop_strings_truncate_even_across_token_boundaries(engine: Engine) -> None:
    prompt = chat(engine, "What is the capital of France?")
    full = (await collect(engine, prompt, GREEDY))[0]
    pieces = [engine.decode(full["ids"][: i + 1]) for i in range(len(full["ids"]))]
    # A stop string made of the end of one token and the start of the next.
    boundary = next(len(p) for p in pieces[2:] if 1 < len(p) < len(full["text"]) - 2)
    stop = full["text"][boundary - 1 : boundary + 2]
    expected = full["text"][: full["text"].index(stop)]
    result = (await collect(engine, prompt, SamplingParams(max_tokens=24, temperature=0.0,
                                                           stop=("@@never@@", stop))))[0]
    assert result["finish"] == "stop"
    assert result["text"] == expected
    assert stop not in result["text"]


@pytest.mark.slow
async def test_max_tokens_and_context_limit_give_length(
    engine: Engine, tiny_model_dir: Path
) -> None:
    from server.engines.transformers_engine import TransformersEngine

    prompt = chat(engine, "Hello!")
    result = (await collect(engine, prompt, SamplingParams(max_tokens=2, temperature=0.0)))[0]
    assert len(result["ids"]) == 2 and result["finish"] == "length"

    short = TransformersEngine(str(tiny_model_dir), device="cpu", max_model_len=len(prompt) + 3)
    await short.start()
    try:
        capped = (await collect(short, prompt, SamplingParams(max_tokens=50, temperature=0.0)))[0]
        assert len(capped["ids"]) == 3 and capped["finish"] == "length"
        with pytest.raises(PromptTooLongError):
            short.generate(prompt + [prompt[-1]] * 3, GREEDY, "too-long")
    finally:
        await short.stop()


@pytest.mark.slow
async def test_eos_ends_with_stop_and_stays_out_of_the_text(engine: Engine) -> None:
    prompt = chat(engine, "What is 7 plus 5?")
    result = (await collect(engine, prompt, SamplingParams(max_tokens=100, temperature=0.0)))[0]
    assert result["finish"] == "stop"
    assert result["ids"][-1] in engine.eos_token_ids  # token ids and logprobs include EOS
    assert len(result["lps"]) == len(result["ids"])
    assert result["text"] == engine.decode(result["ids"][:-1])


@pytest.mark.slow
@pytest.mark.parametrize("own_process", [False, True], ids=["in-process", "own-process"])
async def test_cancelling_the_stream_frees_the_slot(tiny_model_dir: Path,
                                                    own_process: bool) -> None:
    from server.engines.engine_process import TransformersProcessEngine
    from server.engines.transformers_engine import TransformersEngine

    kind = TransformersProcessEngine if own_process else TransformersEngine
    eng = kind(str(tiny_model_dir), device="cpu", max_batch_size=1, ignore_eos=True)
    await eng.start()
    try:
        prompt = chat(eng, "Hello!")
        stream = eng.generate(prompt, SamplingParams(max_tokens=400), "long")
        await anext(stream)
        assert eng.stats().running == 1
        await stream.aclose()  # the client went away
        # The only slot must be free again, else this request would wait behind the long one.
        short = await asyncio.wait_for(collect(eng, prompt, SamplingParams(max_tokens=3)), 30)
        assert short[0]["finish"] == "length"
        assert eng.stats().running == 0 and eng.stats().waiting == 0
    finally:
        await eng.stop()


@pytest.mark.slow
async def test_many_concurrent_requests_all_complete(tiny_model_dir: Path) -> None:
    from server.engines.transformers_engine import TransformersEngine

    eng = TransformersEngine(str(tiny_model_dir), device="cpu", max_batch_size=8,
                             stream_interval_ms=1e6)
    await eng.start()
    try:
        params = [SamplingParams(max_tokens=4 + i % 9, temperature=(i % 3) / 2, n=1 + i % 2)
                  for i in range(40)]
        results = await asyncio.gather(*(collect(eng, chat(eng, QUESTIONS[i % 6]), p, f"c{i}")
                                         for i, p in enumerate(params)))
        for p, result in zip(params, results, strict=True):
            assert sorted(result) == list(range(p.n))
            for choice in result.values():
                assert choice["finish"] in ("stop", "length")
                assert 1 <= len(choice["ids"]) <= p.max_tokens
                assert choice["deltas"] <= 2  # a huge stream interval coalesces into first + last
        assert eng.stats().running == 0
    finally:
        await eng.stop()


@pytest.mark.slow
async def test_stop_aborts_what_cannot_finish(tiny_model_dir: Path) -> None:
    from server.engines.base import EngineError
    from server.engines.transformers_engine import TransformersEngine

    eng = TransformersEngine(str(tiny_model_dir), device="cpu", ignore_eos=True)
    await eng.start()
    prompt = chat(eng, "Hello!")
    stream = eng.generate(prompt, SamplingParams(max_tokens=450), "endless")
    await anext(stream)
    await eng.stop(drain_timeout_s=0.0)
    with pytest.raises(EngineError):
        async for _ in stream:
            pass
    with pytest.raises(EngineError):
        eng.generate(prompt, GREEDY, "late")


def perturbed_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of the model with different weights, as a new policy version would be."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(dst)
    return dst


@pytest.mark.slow
async def test_swap_weights_mid_stream(tiny_model_dir: Path, tmp_path: Path) -> None:
    from server.engines.transformers_engine import TransformersEngine

    new_dir = perturbed_checkpoint(tiny_model_dir, tmp_path / "policy-1")
    engines = [TransformersEngine(str(path), device="cpu", ignore_eos=True)
               for path in (tiny_model_dir, tiny_model_dir, new_dir)]
    eng, old_reference, new_reference = engines
    for e in engines:
        await e.start()
    try:
        prompt = chat(eng, "What is the capital of France?")
        params = SamplingParams(max_tokens=400, temperature=0.0)  # long enough to outlast the load
        stream = eng.generate(prompt, params, "in-flight")
        first = await anext(stream)
        await eng.swap_weights(str(new_dir), "policy-1")
        assert eng.policy_version == "policy-1"
        assert eng.stats().extra["policy_versions"] == ["policy-0", "policy-1"]  # both serve now
        after = await collect(eng, prompt, params, "after")
        in_flight = [first] + [d async for d in stream]
        assert {d.policy_version for d in in_flight} == {"policy-0"}
        assert after[0]["versions"] == {"policy-1"}
        old_ids = [t for d in in_flight for t in d.token_ids]
        assert old_ids == (await collect(old_reference, prompt, params))[0]["ids"]
        assert after[0]["ids"] == (await collect(new_reference, prompt, params))[0]["ids"]
        assert after[0]["ids"] != old_ids
        assert eng.stats().extra["policy_versions"] == ["policy-1"]  # old weights dropped

        with pytest.raises(SwapError):
            await eng.swap_weights(str(tmp_path / "missing"), "policy-2")
        assert eng.policy_version == "policy-1"
        still = await collect(eng, prompt, SamplingParams(max_tokens=5), "still")
        assert still[0]["versions"] == {"policy-1"} and still[0]["finish"] == "length"
    finally:
        for e in engines:
            await e.stop()


@pytest.mark.slow
def test_create_engine_builds_the_transformers_engine(tiny_model_dir: Path) -> None:
    from flywheel.settings import Settings
    from server.engines import create_engine
    from server.engines.transformers_engine import TransformersEngine

    settings = Settings(model=str(tiny_model_dir), device="cpu", max_batch_size=4,
                        engine_process=False)
    eng = create_engine(settings, policy_version="policy-7")
    assert isinstance(eng, TransformersEngine) and isinstance(eng, Engine)
    assert eng.policy_version == "policy-7" and eng.max_model_len == 512
