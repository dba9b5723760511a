"""PPO rollouts sampled by a vLLM engine in the worker, its weights synced to the policy.

The engine is built as the server's is, by the vLLM adapter both share (``flywheel.vllm``):
``load_vllm_bindings`` builds the ``AsyncLLM`` (vLLM imported only there), ``engine_args`` gives
its arguments (KV cache in bytes on CPU, eager mode, dtype) and ``swap.swap_in_place`` reloads
weights in place (pause, reload, resume, prefix cache cleared). One owner each: rollouts
construct and swap vLLM exactly as serving does.

Sync: before each rollout that follows an update, the trainer writes the policy's weights to a
fresh directory and the engine reloads from it (``reload_weights``), about as long as a
checkpoint save; a new path each step so that no reload can serve a cached copy (vLLM #32718).
vLLM's weight-transfer API (NCCL or CUDA IPC, no disk) is the faster path on GPUs, not used yet.

The trainer is synchronous and ``AsyncLLM`` is not: the engine lives on an event loop this
object owns, which runs only inside its calls.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from flywheel.engine_types import SamplingParams
from flywheel.settings import PPOConfig, Settings
from flywheel.vllm.bindings import load_vllm_bindings
from flywheel.vllm.params import engine_args, sampled_logprobs, sampling_kwargs
from flywheel.vllm.swap import swap_in_place
from trainer_worker.ppo.rollout import Rollout, assemble_rollout

log = logging.getLogger(__name__)
T = TypeVar("T")


class VLLMRollouts:
    """A vLLM ``AsyncLLM`` sampling PPO rollouts with their logprobs, synced by ``sync``."""

    def __init__(self, settings: Settings, cfg: PPOConfig, policy_dir: Path, *,
                 eos_token_ids: Sequence[int], pad_token_id: int, device: str = "cpu",
                 extra_engine_args: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.device = device
        self._api = load_vllm_bindings()
        from vllm.sampling_params import RequestOutputKind

        self._final_only = RequestOutputKind.FINAL_ONLY  # one output per request, not a stream
        extra = {"gpu_memory_utilization": cfg.rollout_gpu_memory_utilization,
                 "enable_prefix_caching": False,  # each prompt is sampled once per sync
                 **(extra_engine_args or {})}
        args = engine_args(settings, extra, on_cpu=self._api.on_cpu)
        args.update(model=str(policy_dir), seed=cfg.seed)
        args.setdefault("tokenizer", str(settings.model))  # checkpoints may lack one
        self.dtype = str(args.get("dtype"))
        os.environ.setdefault("VLLM_CACHE_ROOT", str(settings.vllm_cache_dir))
        self._loop = asyncio.new_event_loop()
        try:
            self._llm = self._run(self._build(args))
        except BaseException:
            self._loop.close()
            raise
        self._sync_root = Path(tempfile.mkdtemp(prefix="flywheel-rollout-weights-"))
        self._requests = itertools.count()
        try:
            # vLLM's first batch costs seconds on CPU (kernel set-up): paid here, as start-up.
            self._run(self._generate_all([[self.eos_token_ids[0]] * 8] * cfg.rollout_batch_size))
        except BaseException:
            self.close()  # a live engine core would keep this process from exiting
            raise
        self._requests = itertools.count()  # rollout seeds do not depend on the warm-up
        self._weights_path = str(policy_dir)
        self._version = "ppo-sync-0"
        self._syncs = itertools.count(1)
        log.info("vLLM rollouts from %s (%s)", policy_dir, self.dtype)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    async def _build(self, args: dict[str, Any]) -> Any:
        return self._api.build_engine(args)  # built on our loop: its output handler runs there

    def sample(self, prompts: Sequence[Sequence[int]]) -> Rollout:
        """One answer per prompt from the engine's current weights, with vLLM's logprobs of the
        sampled tokens (after temperature, ``logprobs_mode="processed_logprobs"``)."""
        outputs = self._run(self._generate_all(prompts))
        answers = [tokens for tokens, _ in outputs]
        logprobs = [lps for _, lps in outputs]
        return assemble_rollout(prompts, answers, logprobs, eos_token_ids=self.eos_token_ids,
                                pad_token_id=self.pad_token_id, device=self.device)

    async def _generate_all(self, prompts: Sequence[Sequence[int]]
                            ) -> list[tuple[list[int], list[float]]]:
        return list(await asyncio.gather(*(self._generate(list(p)) for p in prompts)))

    async def _generate(self, prompt: list[int]) -> tuple[list[int], list[float]]:
        number = next(self._requests)
        # Per-request seeds: a cycle's rollouts are reproducible, as the HF sampler's are.
        params = SamplingParams(max_tokens=self.cfg.max_new_tokens,
                                temperature=self.cfg.temperature,
                                seed=self.cfg.seed * 1_000_003 + number)
        vllm_params = self._api.sampling_params(**{
            **sampling_kwargs(params), "stop_token_ids": self.eos_token_ids,
            "detokenize": False,  # PPO needs token ids only
            "output_kind": self._final_only})
        final = None
        async for output in self._llm.generate(self._api.tokens_input(prompt), vllm_params,
                                               f"ppo-{number}"):
            final = output
        if final is None or not final.outputs:
            raise RuntimeError(f"vLLM returned no output for rollout request ppo-{number}")
        completion = final.outputs[0]
        tokens = [int(t) for t in completion.token_ids]
        return tokens, sampled_logprobs(tokens, completion.logprobs)

    def sync(self, policy: nn.Module) -> None:
        """Load ``policy``'s current weights into the engine (in place, between steps)."""
        version = f"ppo-sync-{next(self._syncs)}"
        path = self._sync_root / version
        policy.save_pretrained(path)  # config.json + model.safetensors, fp32
        self._run(swap_in_place(self._llm, str(path), version,
                                previous_path=self._weights_path,
                                previous_version=self._version, repack=self._api.on_cpu))
        previous = Path(self._weights_path)
        self._weights_path, self._version = str(path), version
        if previous.parent == self._sync_root:
            shutil.rmtree(previous, ignore_errors=True)

    def close(self) -> None:
        """Shut the engine down and delete the synced weights."""
        try:
            self._llm.shutdown()
            self._run(asyncio.sleep(0))  # let cancelled tasks finish on the loop
            self._llm = None  # its __del__ shuts down again: now, not at interpreter exit
        finally:
            self._loop.close()
            shutil.rmtree(self._sync_root, ignore_errors=True)

    def __enter__(self) -> VLLMRollouts:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
