"""Loading the policy and reference models, LoRA wrapping, and writing the new policy."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from flywheel.checkpoints import ADAPTER_CONFIG, ADAPTER_DIR
from flywheel.settings import PPOConfig
from trainer_worker.reward.model import disable_dropout, read_eos_token_ids


def load_causal_lm(path: Path, device: str, *, trainable: bool = False) -> PreTrainedModel:
    """A causal LM in float32 with dropout off; frozen unless ``trainable``."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    disable_dropout(model)
    model.requires_grad_(trainable)
    return model.to(device)


def resolve_eos_token_ids(policy_dir: Path, eos_token_ids: list[int] | None) -> list[int]:
    ids = list(eos_token_ids) if eos_token_ids else read_eos_token_ids(policy_dir)
    if not ids:
        raise ValueError(f"{policy_dir} names no EOS token; pass eos_token_ids")
    return ids


def fit_prompts(prompts: Sequence[Sequence[int]], model: PreTrainedModel,
                max_new_tokens: int) -> list[list[int]]:
    """Drop empty prompts; keep the last tokens of those too long to leave room for an answer."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    room = max(1, limit - max_new_tokens) if limit else None
    fitted = [list(p)[-room:] if room else list(p) for p in prompts if p]
    if not fitted:
        raise ValueError("no non-empty prompts")
    return fitted


def filler_token_id(model: PreTrainedModel, eos_token_ids: list[int]) -> int:
    """Any valid id to fill padding with; masks, never token values, say what is padding."""
    pad = model.config.get_text_config().pad_token_id
    if isinstance(pad, int) and pad >= 0:
        return pad
    return eos_token_ids[0]


def add_lora(model: nn.Module, cfg: PPOConfig, task_type: str | None) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on every linear layer (peft), dropout off."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", task_type=task_type)
    return get_peft_model(model, lora)


class AdaptersOff(nn.Module):
    """The frozen base under a LoRA policy: the policy run with its adapters disabled, so the
    KL reference costs no second copy of the weights (TRL's PPO with peft does the same)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self._policy = [policy]  # in a list: not a submodule, its parameters stay the policy's

    @property
    def config(self) -> Any:
        return self._policy[0].config

    def get_base_model(self) -> nn.Module:
        return self._policy[0].get_base_model()

    def forward(self, **inputs: Any) -> Any:
        policy = self._policy[0]
        with policy.disable_adapter():
            return policy(**inputs)


def load_lora_policy(policy_dir: Path, base_dir: Path, cfg: PPOConfig, device: str
                     ) -> nn.Module | None:
    """The base model with adapters to train: the active policy's own (saved relative to the
    base, as vLLM serves them) or fresh ones when the active policy is the base. None when the
    active policy is a full-weight checkpoint: there is no adapter on the base to continue."""
    adapter = Path(policy_dir) / ADAPTER_DIR
    is_base = Path(policy_dir).resolve() == Path(base_dir).resolve()
    if not is_base:
        config = Path(policy_dir) / ADAPTER_CONFIG
        if not config.is_file():
            return None
        on = json.loads(config.read_text()).get("base_model_name_or_path") or ""
        if not on or Path(on).resolve() != Path(base_dir).resolve():
            return None  # an adapter on some other model
    base = load_causal_lm(Path(base_dir), device)
    if is_base:
        return add_lora(base, cfg, task_type="CAUSAL_LM")
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter, is_trainable=True).to(device)


def save_policy(policy: nn.Module, policy_dir: Path, out_dir: Path, use_lora: bool) -> None:
    """Write a complete HF directory: weights (safetensors), config, generation config, tokenizer.

    With LoRA the adapter goes to ``out_dir/adapter`` (relative to ``policy_dir`` as base) and the
    merged full model to ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if use_lora:
        policy.save_pretrained(out_dir / ADAPTER_DIR)
        policy = policy.merge_and_unload()
    policy.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(out_dir)
