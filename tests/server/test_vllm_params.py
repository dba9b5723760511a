"""The vLLM engine's pure mappings (no vLLM installed): sampling, outputs, engine arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.vllm.params import CPU_KV_CACHE_BYTES, engine_args, lora_rank_slot, sampling_kwargs
from server.engines.base import ChoiceDelta, EngineError, SamplingParams
from server.engines.vllm_params import (
    build_sampling_params,
    eos_token_ids,
    map_finish_reason,
    shape_mismatches,
    to_choice_delta,
)
from tests.server.vllm_standin import (
    CONFIG,
    Kind,
    Lp,
    StandInSamplingParams,
    completion,
    hf_dir,
    settings_for,
)


def test_sampling_params_map_every_field() -> None:
    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, n=3, stop=("\n", "END"),
                            seed=11, top_logprobs=5)
    assert sampling_kwargs(params) == {"n": 3, "temperature": 0.7, "top_p": 0.9, "seed": 11,
                                       "stop": ["\n", "END"], "max_tokens": 32, "logprobs": 5,
                                       "flat_logprobs": True,
                                       "detokenize": True}  # vLLM matches stop strings on text
    built = build_sampling_params(params, StandInSamplingParams, Kind.DELTA)
    assert built.output_kind is Kind.DELTA and built.logprobs == 5 and built.n == 3


def test_sampled_logprob_is_always_requested() -> None:
    kwargs = sampling_kwargs(SamplingParams(max_tokens=4))
    assert kwargs["logprobs"] == 0  # 0: only the sampled token's logprob
    assert kwargs["stop"] is None and kwargs["seed"] is None
    assert kwargs["detokenize"] is False  # no stop strings: the engine spells the text itself


def test_text_of_undetokenized_deltas_adds_up_to_decoding_at_once() -> None:
    """Byte-level tokens, one byte each: a two-byte character split over two deltas comes out
    whole with the second, and a character cut off by the end is flushed as decoding would."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from server.engines.detokenize import ChoiceTexts

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))},
                               merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    ids = tokenizer.encode("né!", add_special_tokens=False)
    assert len(ids) == 4  # n, two bytes of é, !
    texts = ChoiceTexts(tokenizer)
    pieces = [to_choice_delta(completion(0, [t], text=""), "p", 0, str, texts) for t in ids[:3]]
    assert [d.text for d in pieces if d is not None] == ["n", "", "é"]
    last = to_choice_delta(completion(0, [ids[3]], text="", finish="length"), "p", 0, str, texts)
    assert last is not None and last.text == "!" and last.finish_reason == "length"
    cut = ChoiceTexts(tokenizer)
    assert cut.text(1, ids[:2], finished=True) == tokenizer.decode(ids[:2])  # "n\ufffd"


@pytest.mark.parametrize(("vllm_reason", "ours"), [
    (None, None), ("stop", "stop"), ("length", "length"), ("repetition", "stop")])
def test_finish_reasons(vllm_reason: str | None, ours: str | None) -> None:
    assert map_finish_reason(vllm_reason) == ours


@pytest.mark.parametrize("vllm_reason", ["abort", "error"])
def test_unfinished_requests_raise(vllm_reason: str) -> None:
    with pytest.raises(EngineError):
        map_finish_reason(vllm_reason)


def test_delta_keeps_sampled_logprobs_and_top_alternatives_by_rank() -> None:
    positions = [
        [(5, Lp(-2.0, 3, "x")), (6, Lp(-0.2, 1, "y")), (7, Lp(-1.0, 2, None))],  # 5 of rank 3
        [(8, Lp(-0.1, 1, "z")), (8, Lp(-0.1, 1, "z")), (9, Lp(-2.5, 2, "w"))],  # 8, also top 1
    ]
    comp = completion(1, [5, 8], text="xz", logprobs=positions)
    delta = to_choice_delta(comp, "policy-4", 2, decode=lambda t: f"<{t}>")
    assert delta == ChoiceDelta(index=1, text="xz", token_ids=[5, 8], logprobs=[-2.0, -0.1],
                                policy_version="policy-4",
                                top_logprobs=[{"y": -0.2, "<7>": -1.0}, {"z": -0.1, "w": -2.5}],
                                finish_reason=None)
    assert list(delta.top_logprobs[0]) == ["y", "<7>"]  # type: ignore[index]


def test_delta_without_alternatives_and_empty_deltas() -> None:
    delta = to_choice_delta(completion(0, [70]), "p", 0, decode=str)
    assert delta is not None and delta.top_logprobs is None and delta.logprobs == [-0.5]
    assert to_choice_delta(completion(0, [], text=""), "p", 0, decode=str) is None
    final = to_choice_delta(completion(0, [], text="", finish="length"), "p", 0, decode=str)
    assert final is not None and final.finish_reason == "length" and final.token_ids == []


def test_delta_with_missing_logprobs_is_an_engine_error() -> None:
    comp = completion(0, [70, 71], logprobs=[[(70, Lp(-0.5, 1))]])
    with pytest.raises(EngineError):
        to_choice_delta(comp, "p", 0, decode=str)
    shifted = completion(0, [70, 71], logprobs=[[(71, Lp(-0.5, 1))], [(70, Lp(-0.5, 1))]])
    with pytest.raises(EngineError, match="sampled"):
        to_choice_delta(shifted, "p", 0, decode=str)


def test_engine_args(tmp_path: Path) -> None:
    args = engine_args(settings_for(tmp_path))
    assert args["model"] == str(tmp_path / "base")
    assert args["logprobs_mode"] == "processed_logprobs"
    assert args["dtype"] == "bfloat16" and "enable_lora" not in args
    lora = engine_args(settings_for(tmp_path, use_lora=True), {"enforce_eager": True})
    assert lora["enable_lora"] is True and lora["max_lora_rank"] == 16
    assert lora["max_loras"] == 2 and lora["enforce_eager"] is True


def test_lora_rank_slots() -> None:
    assert [lora_rank_slot(r) for r in (1, 2, 16, 17, 300)] == [1, 8, 16, 32, 320]
    with pytest.raises(ValueError):
        lora_rank_slot(1024)


def test_eos_ids_and_shape_checks(tmp_path: Path) -> None:
    base = hf_dir(tmp_path / "base")
    assert eos_token_ids(base, 2) == (2, 7)
    assert shape_mismatches(CONFIG, {**CONFIG, "hidden_size": 32}) == ["hidden_size"]
    assert shape_mismatches(CONFIG, dict(CONFIG)) == []



def test_cpu_engine_args_fit_a_shared_machine(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    cpu = engine_args(settings, on_cpu=True)
    assert cpu["dtype"] == "float32"  # the trainer's: stored logprobs are what PPO recomputes
    assert cpu["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES and "enforce_eager" not in cpu
    gpu = engine_args(settings)
    assert gpu["dtype"] == "bfloat16" and "kv_cache_memory_bytes" not in gpu
    sized = settings.model_copy(update={"vllm_kv_cache_bytes": 1 << 26, "dtype": "bfloat16",
                                        "vllm_enforce_eager": True})
    args = engine_args(sized, on_cpu=True)
    assert (args["kv_cache_memory_bytes"], args["dtype"], args["enforce_eager"]) == (
        1 << 26, "bfloat16", True)
    assert settings.vllm_cache_dir == (tmp_path / "vllm").resolve()
