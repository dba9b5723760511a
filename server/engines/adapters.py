"""A LoRA policy's adapter as low-rank weight differences, for the routed forward.

The trainer writes a LoRA policy as its merged weights beside the adapter it merged (peft's files
under ``adapter/``, on the base model: ``flywheel.checkpoints.ADAPTER_DIR``). On every adapted
linear layer the policy's weight is the base's plus ``B @ A * alpha / r``, so two policies on
one base differ there by a product of rank r1 + r2. ``routing.py`` uses that to serve a canary
beside the active policy as multi-LoRA servers do (S-LoRA, vLLM's punica kernels): the first
model's layer once over all rows, then each other model's rows through its difference's two thin
products, instead of a whole product per model.

Only peft's plain LoRA is read (no DoRA, biases, per-module alphas or saved modules), and only
where it explains the merged weights (``explains``): anything else is served as full weights.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch

from flywheel.checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CheckpointReader

ATTRIBUTE = "flywheel_adapter"  # on a served model: its ``dict[str, LowRank]``, by module name
PEFT_PREFIX = "base_model.model."
# Adapter settings and the only values read: others make the merged weight something else than
# base + B @ A * scale, or add weights besides A and B (their policies are served as full weights).
PLAIN_SETTINGS = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                  "modules_to_save": None, "alpha_pattern": {}, "layer_replication": None,
                  "trainable_token_indices": None}
CHUNK_ROWS = 1024  # ``explains`` compares weights this many rows at a time (bounded memory)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowRank:
    """A weight difference ``up @ down``: ``down`` (r, in), ``up`` (out, r), scale included."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        """The product's inner size (r)."""
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """The (out, in) shape of the weight it changes."""
        return int(self.up.shape[0]), int(self.down.shape[1])

    def to(self, like: torch.Tensor) -> LowRank:
        """In ``like``'s dtype and on its device."""
        return LowRank(self.down.to(like), self.up.to(like))

    def weight(self) -> torch.Tensor:
        """The difference as a dense (out, in) matrix."""
        return self.up @ self.down


def read_adapter(reader: CheckpointReader) -> dict[str, LowRank]:
    """The checkpoint's LoRA adapter by module name (``model.layers.0.self_attn.q_proj``); {}
    when it has none, or one this module does not read (settings beyond ``PLAIN_SETTINGS``, or
    files it cannot parse: the merged weights serve alone, with a warning)."""
    if ADAPTER_CONFIG not in reader.names or ADAPTER_WEIGHTS not in reader.names:
        return {}
    try:
        return _parse(json.loads(reader.read(ADAPTER_CONFIG)), reader.read(ADAPTER_WEIGHTS))
    except ValueError as exc:
        logger.warning("%s: adapter not read (%s); its merged weights serve alone",
                       reader.directory, exc)
        return {}


def _parse(config: object, weights: bytes) -> dict[str, LowRank]:
    """peft's LoRA config and weights as factors; ValueError for anything else."""
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError("not a LoRA adapter config")
    for key, plain in PLAIN_SETTINGS.items():
        if config.get(key, plain) not in (plain, None, [], {}):
            raise ValueError(f"{key}={config[key]!r} is not read")
    alpha, rslora = config.get("lora_alpha", 8), config.get("use_rslora", False)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not isinstance(rslora,
                                                                                       bool):
        raise ValueError("lora_alpha or use_rslora of another type")
    try:
        tensors = safetensors.torch.load(weights)
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"unreadable weights: {exc}") from exc
    factors: dict[str, LowRank] = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        up = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if (up is None or down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]
                or down.shape[0] == 0):
            raise ValueError(f"{key}: no matching lora_B of its rank")
        rank = down.shape[0]
        scale = float(alpha) / (math.sqrt(rank) if rslora else rank)
        name = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        factors[name] = LowRank(down.float(), up.float() * scale)
    return factors


def attach(model: Any, factors: dict[str, LowRank]) -> Any:
    """``model`` carrying ``factors``, each in its module's dtype and on its device, for
    ``routing.py``; none if any names no module or not its weight's shape."""
    placed: dict[str, LowRank] = {}
    for name, low_rank in factors.items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            weight = None
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != low_rank.shape:
            logger.warning("adapter module %s matches no weight of the model: adapter not used",
                           name)
            placed = {}
            break
        placed[name] = low_rank.to(weight)
    setattr(model, ATTRIBUTE, placed)
    return model


def adapter_of(model: Any) -> dict[str, LowRank]:
    """The factors ``attach`` gave ``model``; {} for a model loaded without an adapter."""
    factors: dict[str, LowRank] = getattr(model, ATTRIBUTE, None) or {}
    return factors


def difference(first: LowRank | None, other: LowRank | None) -> LowRank | None:
    """``other``'s adapter minus ``first``'s (both on one base) as one product of their ranks
    summed; None where neither has one."""
    downs, ups = [], []
    if other is not None:
        downs.append(other.down)
        ups.append(other.up)
    if first is not None:
        downs.append(first.down)
        ups.append(-first.up)
    return LowRank(torch.cat(downs), torch.cat(ups, dim=1)) if downs else None


@torch.no_grad()
def explains(weight: torch.Tensor, first: torch.Tensor, delta: LowRank | None) -> bool:
    """Whether ``weight`` is ``first`` plus ``delta``: equal where ``delta`` is None (a layer
    no adapter changed is the same after a merge), else each element within the rounding of a
    merge in the weights' dtype: each of the two weights rounded once to its dtype (``eps``
    times the element's magnitudes), plus the product's sum of rank terms rounded in float32 in
    another order than the trainer's merge (``rank * eps32 * (|up| @ |down|)``, bounded per
    row by ``|up|``'s row sum times ``|down|``'s largest: no second product, which with a bound
    built of a dozen passes over each weight made this check 90% of ``routing.route``'s time).
    A weight that is not finite is never explained."""
    if weight.shape != first.shape or weight.dtype != first.dtype:
        return False
    if delta is None:
        return torch.equal(weight, first)
    if delta.shape != tuple(weight.shape) or not weight.dtype.is_floating_point:
        return False
    eps, eps32 = torch.finfo(weight.dtype).eps, torch.finfo(torch.float32).eps
    down = delta.down.float()
    down_largest = float(down.abs().max()) if down.numel() else 0.0
    for rows in range(0, weight.shape[0], CHUNK_ROWS):
        part = slice(rows, rows + CHUNK_ROWS)
        up, merged, base = delta.up[part].float(), weight[part].float(), first[part].float()
        excess = torch.addmm(base, up, down).sub_(merged).abs_()  # |base + up @ down - merged|
        excess.sub_(merged.abs().add_(base.abs()), alpha=eps)  # NaN where a weight is not finite
        product = delta.rank * eps32 * down_largest * up.abs().sum(dim=1)
        if not bool((excess.amax(dim=1) <= product).all()):  # False for NaN
            return False
    return True
