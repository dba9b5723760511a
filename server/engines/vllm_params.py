"""The server's part of the mapping between Flywheel's engine types and vLLM 0.33's, with no
vLLM import: vLLM outputs as ``ChoiceDelta``s, and the checks a checkpoint passes before the
engine loads it. Engine arguments and sampling keywords, which the trainer's rollout engine
builds too, are ``flywheel/vllm/params.py``.

Everything here takes plain values (or duck-typed vLLM objects) and returns plain values, so the
mapping is unit-tested without vLLM installed. Source references are to the vLLM 0.33.0 wheel.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flywheel.checkpoints import lora_adapter_dir
from flywheel.vllm.params import sampled_logprobs, sampling_kwargs
from server.engines.base import ChoiceDelta, EngineError, FinishReason, SamplingParams
from server.engines.detokenize import ChoiceTexts

# Config keys that fix parameter shapes: an in-place reload needs them equal.
SHAPE_KEYS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
)

def build_sampling_params(
    params: SamplingParams, sampling_cls: Callable[..., Any], output_kind: Any
) -> Any:
    """A vLLM ``SamplingParams`` streaming with ``output_kind`` (``RequestOutputKind.DELTA``)."""
    return sampling_cls(**sampling_kwargs(params), output_kind=output_kind)


def map_finish_reason(reason: str | None) -> FinishReason | None:
    """vLLM's finish reason string (vllm/v1/engine/__init__.py:37) as an OpenAI one.

    ``abort`` and ``error`` end a request without an answer: they raise ``EngineError``.
    """
    if reason is None:
        return None
    if reason in ("stop", "repetition"):
        return "stop"
    if reason == "length":
        return "length"
    if reason == "abort":
        raise EngineError("the request was aborted by the engine")
    raise EngineError(f"the engine failed the request (finish reason {reason!r})")


def top_alternatives(flat: Any, k: int, decode: Callable[[int], str]) -> list[dict[str, float]]:
    """The ``k`` most likely tokens per position, by rank, as ``{token text: logprob}``.

    After the sampled token, a position of ``FlatLogprobs`` holds the top ``k`` with ranks 1 to
    ``k`` (the sampled token again among them when its rank is within ``k``).
    """
    tops: list[dict[str, float]] = []
    ids, values, spelled = flat.token_ids, flat.logprobs, flat.decoded_tokens
    for start, end in zip(flat.start_indices, flat.end_indices, strict=True):
        tops.append({
            spelled[j] if spelled[j] is not None else decode(ids[j]): float(values[j])
            for j in range(start + 1, min(end, start + 1 + k))})
    return tops


def to_choice_delta(
    completion: Any, policy_version: str, top_k: int, decode: Callable[[int], str],
    texts: ChoiceTexts | None = None,
) -> ChoiceDelta | None:
    """One vLLM ``CompletionOutput`` delta (vllm/outputs.py:59) as a ``ChoiceDelta``; its text
    from ``texts`` when vLLM did not detokenize.

    Returns None for a delta that carries nothing (no token, no text, not finished).
    """
    finish = map_finish_reason(completion.finish_reason)
    token_ids = [int(t) for t in completion.token_ids]
    index = int(completion.index)
    text = completion.text if texts is None else texts.text(index, token_ids, finish is not None)
    if not token_ids and not text and finish is None:
        return None
    flat = completion.logprobs
    return ChoiceDelta(
        index=index,
        text=text,
        token_ids=token_ids,
        logprobs=sampled_logprobs(token_ids, flat),
        policy_version=policy_version,
        top_logprobs=top_alternatives(flat, top_k, decode) if top_k > 0 else None,
        finish_reason=finish,
    )


def spans_other_versions(completion: Any, policy_version: str) -> bool:
    """Whether a finished choice has tokens sampled under another weight version.

    vLLM stamps final outputs with `weight_versions` spans (vllm/outputs.py:49); with
    ``pause_generation(mode="keep")`` a request running across a swap finishes on new weights.
    """
    spans = getattr(completion, "weight_versions", None) or []
    return any(span.version != policy_version for span in spans)


def has_full_weights(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is a Hugging Face directory vLLM can reload weights from."""
    checkpoint = Path(checkpoint)
    return (checkpoint / "config.json").is_file() and any(checkpoint.glob("*.safetensors"))


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face directory ({} when absent or unreadable)."""
    try:
        data = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def shape_mismatches(served: Mapping[str, Any], candidate: Mapping[str, Any]) -> list[str]:
    """Shape-defining config keys whose values differ; an in-place reload needs none."""
    return [key for key in SHAPE_KEYS if served.get(key) != candidate.get(key)]


def full_checkpoint_problem(served: Path, candidate: Path) -> str | None:
    """Why the served model's engine cannot load ``candidate``'s full weights (None: it can)."""
    if not has_full_weights(candidate):
        if lora_adapter_dir(candidate):
            return "a LoRA policy but LoRA is off (FLYWHEEL_PPO__USE_LORA)"
        return "no config.json and *.safetensors"
    mismatches = shape_mismatches(read_model_config(served), read_model_config(candidate))
    if mismatches:
        return (f"differs from the served model in {', '.join(mismatches)}; "
                "in-place reload needs equal shapes")
    return None


def eos_token_ids(model_dir: Path, tokenizer_eos: int | None) -> tuple[int, ...]:
    """The tokenizer's EOS plus ``generation_config.json``'s ``eos_token_id`` (int or list)."""
    ids: list[int] = [tokenizer_eos] if tokenizer_eos is not None else []
    try:
        config = json.loads((Path(model_dir) / "generation_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    extra = config.get("eos_token_id") if isinstance(config, dict) else None
    if isinstance(extra, int):
        extra = [extra]
    ids.extend(int(t) for t in extra or [])
    return tuple(dict.fromkeys(ids))
