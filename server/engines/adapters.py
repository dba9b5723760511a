"""A LoRA policy's adapter as low-rank weight differences, for the routed forward.

The trainer writes a LoRA policy as its merged weights beside the adapter it merged (peft's files
under ``adapter/``, on the base model: ``flywheel.checkpoints.ADAPTER_DIR``). On every adapted
linear layer the policy's weight is the base's plus ``B @ A * alpha / r``, so two policies on
one base differ there by a product of rank r1 + r2. ``routing.py`` uses that to serve a canary
beside the active policy as multi-LoRA servers do (S-LoRA, vLLM's punica kernels): the first
model's layer once over all rows, then each other model's rows through its difference's two thin
products, instead of a whole product per model.

Only peft's plain LoRA is read (no DoRA, biases, per-module alphas or saved modules): anything else
is served as full weights, which is always correct.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch

from flywheel.checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CheckpointReader

ATTRIBUTE = "flywheel_adapter"  # on a served model: its ``dict[str, LowRank]``, by module name
PEFT_PREFIX = "base_model.model."
# Adapter settings under which the merged weight is not base + B @ A * scale, or which add
# weights besides A and B: their adapters are served as the full weights they were merged into.
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
               "modules_to_save": None, "alpha_pattern": {}, "layer_replication": None,
               "trainable_token_indices": None}


@dataclass(frozen=True)
class LowRank:
    """A weight difference ``up @ down``: ``down`` (r, in), ``up`` (out, r), scale included."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def to(self, like: torch.Tensor) -> LowRank:
        return LowRank(self.down.to(like), self.up.to(like))

    def weight(self) -> torch.Tensor:
        """The difference as a dense (out, in) matrix."""
        return self.up @ self.down


def read_adapter(reader: CheckpointReader) -> dict[str, LowRank]:
    """The checkpoint's LoRA adapter by module name (``model.layers.0.self_attn.q_proj``); {}
    when it has none or one this module does not read (``UNSUPPORTED``)."""
    if ADAPTER_CONFIG not in reader.names or ADAPTER_WEIGHTS not in reader.names:
        return {}
    config = json.loads(reader.read(ADAPTER_CONFIG))
    if config.get("peft_type") != "LORA" or any(
            config.get(key, plain) not in (plain, None, [], {}) for key, plain in
            UNSUPPORTED.items()):
        return {}
    tensors = safetensors.torch.load(reader.read(ADAPTER_WEIGHTS))
    alpha = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    factors: dict[str, LowRank] = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        up = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if up is None or down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            return {}
        rank = down.shape[0]
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        name = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        factors[name] = LowRank(down.float(), up.float() * scale)
    return factors


def attach(model: Any, factors: dict[str, LowRank]) -> Any:
    """``model`` carrying ``factors`` (in its dtype and on its device) for ``routing.py``."""
    like = next(model.parameters())
    setattr(model, ATTRIBUTE, {name: f.to(like) for name, f in factors.items()})
    return model


def adapter_of(model: Any) -> dict[str, LowRank]:
    """The factors ``attach`` gave ``model``; {} for a model loaded without an adapter."""
    factors: dict[str, LowRank] = getattr(model, ATTRIBUTE, None) or {}
    return factors


def difference(first: LowRank | None, other: LowRank | None) -> LowRank | None:
    """``other``'s adapter minus ``first``'s (both on one base) as one product of their ranks
    summed; None where neither has one."""
    if first is None and other is None:
        return None
    parts = [(f.down, f.up) for f in (other,) if f is not None]
    parts += [(f.down, -f.up) for f in (first,) if f is not None]
    return LowRank(torch.cat([d for d, _ in parts]), torch.cat([u for _, u in parts], dim=1))


@torch.no_grad()
def explains(weight: torch.Tensor, first: torch.Tensor, delta: LowRank | None) -> bool:
    """Whether ``weight`` is ``first`` plus ``delta`` (None: equal), up to the rounding of a
    merge in the weights' dtype."""
    if weight.shape != first.shape or weight.dtype != first.dtype:
        return False
    want = first.float() if delta is None else torch.addmm(first.float(), delta.up.float(),
                                                           delta.down.float())
    error = float((weight.float() - want).abs().max())
    return error <= 4 * torch.finfo(weight.dtype).eps * max(float(weight.abs().max()), 1e-30)
