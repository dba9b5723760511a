"""The reward model: a causal LM's trunk plus a linear head read at the last real token.

A reward directory holds the trunk as a standard Hugging Face model (``config.json``,
``model.safetensors``), the head in ``reward_head.safetensors`` and ``reward_config.json`` with
the score normalisation statistics and the EOS token ids (N+: ``ScalarModel``; OpenRLHF stores
the RM mean/std beside the weights).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, GenerationConfig, PreTrainedModel

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_config.json"


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability (N+: dropout off in all four models) and set eval mode."""
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in vars(config).items():
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, 0.0)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.eval()


def read_eos_token_ids(model_dir: Path) -> list[int]:
    """EOS ids of a model directory: generation_config first, then config."""
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except (OSError, ValueError):
        eos = None
    if eos is None:
        eos = AutoConfig.from_pretrained(model_dir).eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` computes them: (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def is_reward_dir(path: Path) -> bool:
    return (Path(path) / HEAD_FILE).is_file()


class RewardModel(nn.Module):
    """Trunk + ``nn.Linear(hidden, 1)``; also used as the PPO critic (per-token values)."""

    def __init__(self, trunk: PreTrainedModel, head: nn.Linear, eos_token_ids: list[int],
                 score_mean: float = 0.0, score_std: float = 1.0) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.eos_token_ids = list(eos_token_ids)
        self.score_mean = score_mean
        self.score_std = score_std

    @classmethod
    def from_base(cls, base_dir: Path, *, device: str = "cpu", seed: int = 0) -> RewardModel:
        """A fresh head on the trunk of a causal LM, init std 1/sqrt(d+1) (N+)."""
        trunk = AutoModel.from_pretrained(base_dir, dtype=torch.float32)
        hidden = trunk.config.get_text_config().hidden_size
        head = nn.Linear(hidden, 1)
        generator = torch.Generator().manual_seed(seed)
        nn.init.normal_(head.weight, std=1.0 / math.sqrt(hidden + 1), generator=generator)
        nn.init.zeros_(head.bias)
        model = cls(trunk, head, read_eos_token_ids(Path(base_dir)))
        disable_dropout(model)
        return model.to(device)

    @classmethod
    def from_pretrained(cls, path: Path, *, device: str = "cpu") -> RewardModel:
        path = Path(path)
        trunk = AutoModel.from_pretrained(path, dtype=torch.float32)
        meta = json.loads((path / CONFIG_FILE).read_text())
        state = load_file(path / HEAD_FILE)
        head = nn.Linear(state["weight"].shape[1], 1)
        head.load_state_dict(state)
        model = cls(trunk, head, meta["eos_token_ids"], meta["score_mean"], meta["score_std"])
        disable_dropout(model)
        return model.to(device)

    def save_pretrained(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.trunk.save_pretrained(path)
        head_state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(head_state, path / HEAD_FILE)
        meta = {"score_mean": self.score_mean, "score_std": self.score_std,
                "eos_token_ids": self.eos_token_ids, "hidden_size": self.head.in_features}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def token_scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Head output at every position: (B, T) -> (B, T)."""
        hidden = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask), use_cache=False,
        ).last_hidden_state  # (B, T, H)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)  # (B, T)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Raw score at the last non-pad token of each row (any padding side): (B, T) -> (B,)."""
        scores = self.token_scores(input_ids, attention_mask)  # (B, T)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        last = (positions * attention_mask.long()).argmax(-1)  # (B,) verl ``eos_mask_idx``
        return scores.gather(1, last.unsqueeze(-1)).squeeze(-1)

    def normalize(self, scores: Tensor) -> Tensor:
        """Scores in units of the training answers' spread: mean 0, std 1 (OAI RM normalisation)."""
        return (scores - self.score_mean) / self.score_std

    def fold_normalization(self) -> None:
        """Bake the normalisation into the head so raw outputs are normalised (critic init)."""
        with torch.no_grad():
            self.head.weight.div_(self.score_std)
            self.head.bias.sub_(self.score_mean).div_(self.score_std)
        self.score_mean, self.score_std = 0.0, 1.0
