"""A decode batch over a ``SlotCache``: rows join, decode and leave with their keys and values
in place.

Row ``b`` of the batch owns slot ``b`` of the cache, its tokens in columns up to ``ends[b] - 1``
(a joining row's prompt right-aligned in the columns of its prefill). A decode step writes one
column per row; joining rows (prefilled on their own, a ``PaddedBatch``) are copied into the
slots after the running ones; leaving rows only move the rows after them down. Against
``PaddedBatch``, whose ``DynamicCache`` copies every row's whole history at every token, at every
join and at every leave, only the joining and moved rows are ever copied.

A model whose attention the slot cache cannot serve (a sliding window, an attention kernel that
takes no 4D mask, anything the probe in ``slots_fit`` finds different) decodes in a
``PaddedBatch`` as before.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from flywheel.hf_compat import cache_keyword
from server.engines.batch import PaddedBatch
from server.engines.slot_cache import SlotCache

MASKED_IMPLEMENTATIONS = frozenset({"sdpa", "eager"})  # attention that takes a 4D mask


class SlotBatch:
    """Slot cache, each row's next column (B,), next positions and tokens (B, 1)."""

    def __init__(self, layers: int) -> None:
        self.cache = SlotCache(layers)
        self.ends = torch.zeros(0, dtype=torch.long)  # (B,) the column written next
        self.positions = torch.zeros((0, 1), dtype=torch.long)  # (B, 1) position fed next
        self.tokens: torch.Tensor | None = None  # (B, 1) the token fed next
        self.span = 0  # max(ends): the columns holding anything

    @property
    def size(self) -> int:
        return int(self.ends.shape[0])

    @classmethod
    def adopt(cls, batch: PaddedBatch) -> SlotBatch:
        """A slot batch holding ``batch``'s rows (a prefill's)."""
        slots = cls(len(batch.cache.layers))
        slots.cache.allocate([(layer.keys, layer.values) for layer in batch.cache.layers])
        device = batch.mask.device
        slots.ends = slots.ends.to(device)
        slots.positions = slots.positions.to(device)
        slots.merge(batch)
        return slots

    def decode(self, model: Any) -> torch.Tensor:
        """Feed ``tokens`` (one per row) and return the next logits (B, V)."""
        assert self.tokens is not None, "decode before any token was sampled"
        span = self.span + 1
        self.cache.reserve(self.size, span, self.size, self.span)
        mask = self.cache.prepare(self.ends, span)
        out = model(
            input_ids=self.tokens,
            attention_mask=mask,
            position_ids=self.positions,
            use_cache=True,
            **{cache_keyword(type(model)): self.cache},
        )
        self.ends = self.ends + 1
        self.span = span
        self.positions = self.positions + 1
        return out.logits[:, -1, :]

    def select(self, rows: list[int]) -> None:
        """Keep (and repeat) the given rows, in that order: rows that change slot are copied."""
        moved = [(dst, src) for dst, src in enumerate(rows) if dst != src]
        if moved:
            device = self.ends.device
            dst = torch.tensor([d for d, _ in moved], dtype=torch.long, device=device)
            src = torch.tensor([s for _, s in moved], dtype=torch.long, device=device)
            self.cache.reserve(len(rows), self.span, self.size, self.span)
            self.cache.move_rows(dst, src, self.span)
        index = torch.tensor(rows, dtype=torch.long, device=self.ends.device)
        self.ends = self.ends.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        if self.tokens is not None:
            self.tokens = self.tokens.index_select(0, index)
        self.span = int(self.ends.max()) if rows else 0

    def merge(self, other: PaddedBatch, order: list[int] | None = None) -> None:
        """Add ``other``'s rows after this batch's; ``order``: the merged rows in that order
        instead (indices into this batch's rows, then other's)."""
        size, count = self.size, other.size
        order = order if order is not None else list(range(size + count))
        width = other.mask.shape[1]
        self.cache.reserve(size + count, max(self.span, width), size, self.span)
        mine = [(dst, src) for dst, src in enumerate(order) if src < size and dst != src]
        if mine:  # running rows after a joining group's move down: copy before overwriting
            device = self.ends.device
            self.cache.move_rows(torch.tensor([d for d, _ in mine], device=device),
                                 torch.tensor([s for _, s in mine], device=device), self.span)
        theirs = sorted((src - size, dst) for dst, src in enumerate(order) if src >= size)
        dst = torch.tensor([d for _, d in theirs], dtype=torch.long, device=self.ends.device)
        self.cache.write_rows(dst, [(layer.keys, layer.values) for layer in other.cache.layers],
                              other.mask)
        index = torch.tensor(order, dtype=torch.long, device=self.ends.device)
        joined = self.ends.new_full((count,), width)
        self.ends = torch.cat([self.ends, joined]).index_select(0, index)
        self.positions = torch.cat([self.positions, other.positions]).index_select(0, index)
        if other.tokens is not None and (self.tokens is not None or size == 0):
            mine = self.tokens if self.tokens is not None else other.tokens[:0]
            self.tokens = torch.cat([mine, other.tokens]).index_select(0, index)
        self.span = max(self.span, width)


def slots_fit(model: Any) -> bool:
    """Whether ``model`` decodes in a ``SlotBatch`` as in a ``PaddedBatch``: attention over every
    past token (no sliding window) through a kernel that takes a 4D mask, and a probe of two rows
    of different lengths, one joining later and one leaving, against a forward pass without any
    cache."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in MASKED_IMPLEMENTATIONS:
        return False
    try:
        if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=config).layers):
            return False  # sliding, chunked or linear attention layers
        return _probe(model)
    except Exception:  # any failure to decode in slots is a reason not to
        return False


@torch.inference_mode()
def _probe(model: Any) -> bool:
    """Greedy decoding of rows of different lengths: two rows decode a step, a third joins and
    all decode, the first leaves and the others decode; each step's logits against a forward
    pass of each row's whole sequence without a cache."""
    vocab = model.get_input_embeddings().num_embeddings
    seqs = [[t % vocab for t in seq] for seq in ([1, 2, 3, 4, 5], [6, 7], [8, 9, 10])]
    first, logits = PaddedBatch.prefill(model, seqs[:2], 0)
    batch, rows = SlotBatch.adopt(first), seqs[:2]
    batch.tokens = _feed(rows, logits)
    logits = batch.decode(model)
    alike = _alike(model, rows, logits)
    batch.tokens = _feed(rows, logits)
    joining, joined = PaddedBatch.prefill(model, seqs[2:], 0)
    joining.tokens = _feed(seqs[2:], joined)
    batch.merge(joining)
    rows = seqs
    logits = batch.decode(model)
    alike = alike and _alike(model, rows, logits)
    batch.tokens = _feed(rows, logits)
    batch.select([1, 2])
    rows = seqs[1:]
    return alike and _alike(model, rows, batch.decode(model))


def _feed(rows: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    """Each row's greedy token (B, 1), appended to its sequence."""
    tokens = logits.argmax(dim=-1)
    for row, token in zip(rows, tokens.tolist(), strict=True):
        row.append(token)
    return tokens[:, None]


def _alike(model: Any, rows: list[list[int]], logits: torch.Tensor) -> bool:
    """Whether ``logits`` (B, V) are each row's next logits, given all its tokens but the last
    fed."""
    want = torch.stack([model(input_ids=torch.tensor([row], device=model.device),
                              use_cache=False).logits[0, -1] for row in rows])
    scale = float(want.abs().max()) or 1.0
    tolerance = 1e-4 if want.dtype == torch.float32 else 2e-2
    return bool(((logits - want).abs().max() <= tolerance * scale).item())
