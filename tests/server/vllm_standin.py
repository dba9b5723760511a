"""Stand-ins for the vLLM names the engine uses: a recording ``AsyncLLM``, its outputs, a tokenizer.

They mirror vLLM 0.33's shapes (``CompletionOutput``, ``FlatLogprobs``, ``LoRARequest``) closely
enough for the engine's mapping and swap code, with no vLLM installed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flywheel.settings import Settings
from server.engines.vllm_engine import VLLMBindings

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 4, "vocab_size": 300}


class Kind(Enum):
    CUMULATIVE = 0
    DELTA = 1


class StandInSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


@dataclass(frozen=True)
class StandInLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class Lp:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class Flat:
    """vLLM's ``FlatLogprobs`` (vllm/logprobs.py): every position's entries in flat lists."""

    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)


def flat(positions: list[list[tuple[int, Lp]]]) -> Flat:
    """Positions as vLLM fills them: the sampled token first, then the top-k by rank."""
    out = Flat()
    for entries in positions:
        out.start_indices.append(len(out.token_ids))
        for token, lp in entries:
            out.token_ids.append(token)
            out.logprobs.append(lp.logprob)
            out.ranks.append(lp.rank)
            out.decoded_tokens.append(lp.decoded_token)
        out.end_indices.append(len(out.token_ids))
    return out


def completion(index: int, token_ids: list[int], text: str | None = None,
               finish: str | None = None,
               logprobs: list[list[tuple[int, Lp]]] | None = None,
               spans: list | None = None) -> Any:
    if logprobs is None:  # each token sampled as the most likely one, with one alternative
        logprobs = [[(t, Lp(-0.5, 1, chr(t)))] * 2 for t in token_ids]
    if text is None:
        text = "".join(chr(t) for t in token_ids)
    return SimpleNamespace(index=index, text=text,
                           token_ids=token_ids, logprobs=flat(logprobs), finish_reason=finish,
                           weight_versions=spans)


def output(*completions: Any) -> Any:
    return SimpleNamespace(outputs=list(completions))


def two_choices(sampling: Any) -> list[Any]:
    """n choices, interleaved: one token each, then each stops on EOS (2) in one last output."""
    first = [output(completion(i, [ord("a") + i])) for i in range(sampling.n)]
    last = output(*[completion(i, [2], text="", finish="stop",
                               logprobs=[[(2, Lp(-0.1, 1, ""))] * 2]) for i in range(sampling.n)])
    return [*first, last]


@dataclass
class StandInAsyncLLM:
    """Records every call in order; fails or blocks where a test asks it to."""

    respond: Callable[[Any], list[Any]] = two_choices
    max_model_len: int = 256
    calls: list[tuple] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    failing_paths: set[str] = field(default_factory=set)
    fail: set[str] = field(default_factory=set)  # "pause", "resume", "add_lora", "generate"
    hold_pause: asyncio.Event | None = None
    hold_stream: asyncio.Event | None = None
    closed_streams: int = 0

    def __post_init__(self) -> None:
        self.model_config = SimpleNamespace(max_model_len=self.max_model_len)

    async def pause_generation(self, *, mode: str = "abort", clear_cache: bool = True) -> None:
        self.calls.append(("pause", mode, clear_cache))
        if self.hold_pause is not None:
            await self.hold_pause.wait()
        if "pause" in self.fail:
            raise RuntimeError("pause failed")

    async def resume_generation(self) -> None:
        self.calls.append(("resume",))
        if "resume" in self.fail:
            raise RuntimeError("resume failed")

    async def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                             kwargs: dict | None = None) -> list:
        self.calls.append(("rpc", method, dict(kwargs or {})))
        if (kwargs or {}).get("weights_path") in self.failing_paths:
            raise RuntimeError(f"cannot read {kwargs['weights_path']}")  # type: ignore[index]
        return [None]

    async def update_weight_version(self, new_version: str) -> None:
        self.calls.append(("version", new_version))

    async def add_lora(self, lora_request: Any) -> bool:
        self.calls.append(("add_lora", lora_request))
        return "add_lora" not in self.fail

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, *,
                 lora_request: Any = None) -> AsyncIterator[Any]:
        self.requests.append({"prompt": prompt, "sampling": sampling_params,
                              "request_id": request_id, "lora": lora_request})
        return self._stream(sampling_params)

    async def _stream(self, sampling: Any) -> AsyncIterator[Any]:
        if "generate" in self.fail:
            raise RuntimeError("engine dead")
        try:
            for count, out in enumerate(self.respond(sampling)):
                await asyncio.sleep(0)
                if count == 1 and self.hold_stream is not None:
                    await self.hold_stream.wait()
                yield out
        finally:
            self.closed_streams += 1

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))


class StandInTokenizer:
    """Characters are tokens; 1 is BOS, 2 is EOS."""

    eos_token_id = 2
    chat_template = "<role>content ... <assistant>"

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool,
                            tokenize: bool) -> str:
        assert tokenize is False
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        special = {1: "<s>", 2: "</s>"}
        return "".join(("" if skip_special_tokens else special[i]) if i in special else chr(i)
                       for i in ids)


def bindings(llm: StandInAsyncLLM, built: list[dict] | None = None,
             spares: list[StandInAsyncLLM] | None = None) -> VLLMBindings:
    """The first engine built is ``llm``; later ones (full-weight canaries) are ``spares`` in
    order, else fresh stand-ins. Building from a path in ``llm.failing_paths`` fails."""
    builds = 0

    def build(kwargs: dict[str, Any]) -> StandInAsyncLLM:
        nonlocal builds
        if built is not None:
            built.append(kwargs)
        if kwargs["model"] in llm.failing_paths:
            raise RuntimeError(f"cannot load {kwargs['model']}")
        builds += 1
        if builds == 1:
            return llm
        return spares.pop(0) if spares else StandInAsyncLLM()

    return VLLMBindings(build_engine=build, sampling_params=StandInSamplingParams,
                        delta_kind=Kind.DELTA, lora_request=StandInLoRARequest,
                        tokens_input=lambda ids: {"type": "token", "prompt_token_ids": ids})


def hf_dir(path: Path, **config_changes: Any) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**CONFIG, **config_changes}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    (path / "model.safetensors").write_bytes(b"not read by the stand-in")
    return path


def lora_dir(path: Path) -> Path:
    (path / "adapter").mkdir(parents=True)
    (path / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    return path


def settings_for(tmp_path: Path, use_lora: bool = False) -> Settings:
    return Settings(data_dir=tmp_path, model=str(tmp_path / "base"),
                    database_url="sqlite://", ppo={"use_lora": use_lora})  # type: ignore[arg-type]
