"""A left-padded decode batch over one ``DynamicCache``: prefill, decode, join, leave.

Every row's tokens end at the same cache column, so one decode step feeds one token per row.
Rows carry their own ``position_ids`` (their real length), so padding never shifts RoPE
positions, and padded columns are masked out. Joining rows are prefilled on their own and
their cache is left-padded to the batch's length and concatenated (cheaper than re-prefilling
the whole batch, which recomputes every running row's context).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from flywheel.hf_compat import cache_keyword


class PaddedBatch:
    """KV cache, attention mask (B, L), next positions (B, 1) and next input tokens (B, 1)."""

    def __init__(
        self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor
    ) -> None:
        self.cache = cache
        self.mask = mask  # (B, L) 1 on real tokens
        self.positions = positions  # (B, 1) position of the token fed next
        self.tokens: torch.Tensor | None = None  # (B, 1) the token fed next

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @classmethod
    def prefill(
        cls, model: torch.nn.Module, prompts: list[list[int]], pad_id: int
    ) -> tuple[PaddedBatch, torch.Tensor]:
        """Run the left-padded prompts through ``model``: the batch and the last logits (B, V)."""
        device = model.device
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, length - len(prompt) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=-1) - 1).clamp_(min=0)  # (B, L)
        cache = DynamicCache()
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_keyword(type(model)): cache},
        )
        batch = cls(cache, mask, positions[:, -1:] + 1)
        if bool((mask == 0).any()):
            batch._zero_padding()
        return batch, out.logits[:, -1, :]

    def decode(self, model: torch.nn.Module) -> torch.Tensor:
        """Feed ``tokens`` (one per row) and return the next logits (B, V)."""
        assert self.tokens is not None, "decode before any token was sampled"
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=1)
        out = model(
            input_ids=self.tokens,
            attention_mask=self.mask,
            position_ids=self.positions,
            use_cache=True,
            **{cache_keyword(type(model)): self.cache},
        )
        self.positions = self.positions + 1
        return out.logits[:, -1, :]

    def select(self, rows: list[int]) -> None:
        """Keep (and repeat, for ``n`` > 1) the given rows, in that order; drop empty columns."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        if self.tokens is not None:
            self.tokens = self.tokens.index_select(0, index)
        self._trim_left()

    def merge(self, other: PaddedBatch, order: list[int] | None = None) -> None:
        """Append ``other``'s rows, left-padding whichever side is shorter in time; ``order``:
        the merged rows in that order instead (indices into this batch's rows, then other's),
        in the same copy."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        runs = _runs(order, self.size) if order is not None else [(0, 0, self.size),
                                                                  (1, 0, other.size)]

        def join(mine: torch.Tensor, theirs: torch.Tensor, pad: bool = True) -> torch.Tensor:
            sides = (_pad_left(mine, length), _pad_left(theirs, length)) if pad else (mine, theirs)
            return torch.cat([sides[side][start:stop] for side, start, stop in runs])

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = join(mine.keys, theirs.keys)
            mine.values = join(mine.values, theirs.values)
        self.mask = join(self.mask, other.mask)
        self.positions = join(self.positions, other.positions, pad=False)
        if self.tokens is not None and other.tokens is not None:
            self.tokens = join(self.tokens, other.tokens, pad=False)

    def _trim_left(self) -> None:
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0, 0]) if used.numel() else 0
        if start > 0:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, start:, :]
                layer.values = layer.values[:, :, start:, :]

    def _zero_padding(self) -> None:
        """Zero K/V at padded positions: their values are garbage that must never reach a sum."""
        padded = (self.mask == 0)[:, None, :, None]  # (B, 1, L, 1)
        for layer in self.cache.layers:
            layer.keys = layer.keys.masked_fill(padded, 0.0)
            layer.values = layer.values.masked_fill(padded, 0.0)


def _runs(order: list[int], size: int) -> list[tuple[int, int, int]]:
    """``order`` (indices into ``size`` rows, then another batch's) as runs of consecutive rows:
    (0 for the first batch or 1, start, stop)."""
    runs: list[tuple[int, int, int]] = []
    for index in order:
        side, row = (0, index) if index < size else (1, index - size)
        if runs and runs[-1][0] == side and runs[-1][2] == row:
            runs[-1] = (side, runs[-1][1], row + 1)
        else:
            runs.append((side, row, row + 1))
    return runs


def _pad_left(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad the time axis of a mask (B, T) or K/V (B, H, T, D) on the left to ``length``."""
    time_axis = 1 if x.dim() == 2 else 2
    missing = length - x.shape[time_axis]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[time_axis] = missing
    return torch.cat([x.new_zeros(shape), x], dim=time_axis)
