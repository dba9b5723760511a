"""A KV cache of preallocated rows written in place: one row per running sequence.

Every layer holds keys and values of shape (slots, heads, columns, head_dim), allocated ahead and
grown by doubling. Row ``b`` of the decode batch owns slot ``b``; its tokens fill columns up to
``write_columns[b] - 1`` and a decode step writes the next one at ``write_columns[b]``, so a step
copies one position per row instead of the whole history (``DynamicCache`` concatenates every
layer's keys and values at every token). Attention runs over the first ``span`` columns, with an
additive mask kept beside the slots (``bias``): 0 on each row's own columns, the dtype's minimum
elsewhere, so a step opens one column per row instead of building a mask.

The model's attention modules call ``update`` with the new keys and values, as with any
``transformers`` ``Cache``; the mask is passed in 4D, which ``transformers`` uses as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

MIN_COLUMNS = 128  # first allocation: a prompt and a short answer without growing


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values (slots, heads, columns, head_dim); ``owner`` says where to
    write."""

    is_sliding = False
    is_compileable = False

    def __init__(self, owner: SlotCache) -> None:
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (0, key_states.shape[1], 0, key_states.shape[3])
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros((*shape[:3], value_states.shape[3]))
        self._flatten()
        self.is_initialized = True

    def _flatten(self) -> None:
        """(slots * heads * columns, head_dim) views, which one ``index_copy_`` writes."""
        assert self.keys is not None and self.values is not None
        self._flat_keys = self.keys.view(-1, self.keys.shape[3])
        self._flat_values = self.values.view(-1, self.values.shape[3])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one new position per row (B, H, 1, D) at its row's column; the rows' keys and
        values over the attended span, (B, H, span, D) views."""
        assert self.keys is not None and self.values is not None
        owner, rows, heads = self._owner, key_states.shape[0], key_states.shape[1]
        index = owner.write_index(heads)
        self._flat_keys.index_copy_(0, index, key_states.reshape(rows * heads, -1))
        self._flat_values.index_copy_(0, index, value_states.reshape(rows * heads, -1))
        return self.keys[:rows, :, : owner.span], self.values[:rows, :, : owner.span]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.span, 0

    def get_seq_length(self) -> int:
        return self._owner.span

    def get_max_length(self) -> int:
        return -1

    def resize(self, slots: int, columns: int, keep_rows: int, keep_columns: int) -> None:
        """Reallocate to ``slots`` x ``columns``, keeping the first rows and columns."""
        assert self.keys is not None and self.values is not None
        for name in ("keys", "values"):
            old: torch.Tensor = getattr(self, name)
            new = old.new_zeros((slots, old.shape[1], columns, old.shape[3]))
            new[:keep_rows, :, :keep_columns] = old[:keep_rows, :, :keep_columns]
            setattr(self, name, new)
        self._flatten()


class SlotCache(Cache):
    """The layers' slot tensors and the columns the next forward pass writes and reads."""

    def __init__(self, layers: int) -> None:
        super().__init__(layers=[SlotLayer(self) for _ in range(layers)])
        self.slots = 0
        self.columns = 0
        self.span = 0  # columns attended in the next forward pass
        self.bias = torch.zeros(0, 0)  # (slots, columns): 0 where a row sees a column, else min
        self.write_columns = torch.zeros(0, dtype=torch.long)  # (B,) where each row writes
        self._index: dict[int, torch.Tensor] = {}

    def allocate(self, like: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give every layer empty tensors of the heads, head size, dtype and device of ``like``
        (one (keys, values) pair per layer, e.g. a prefill's cache)."""
        for layer, (keys, values) in zip(self.layers, like, strict=True):
            layer.lazy_initialization(keys, values)
        self.bias = like[0][0].new_zeros((0, 0))

    def reserve(self, slots: int, columns: int, used_rows: int, used_columns: int) -> None:
        """Room for ``slots`` rows of ``columns`` columns, doubling what is short; the first
        ``used_rows`` rows and ``used_columns`` columns are kept."""
        if slots <= self.slots and columns <= self.columns:
            return
        new_slots = max(slots, 2 * self.slots) if slots > self.slots else self.slots
        new_columns = (max(columns, 2 * self.columns, MIN_COLUMNS) if columns > self.columns
                       else self.columns)
        for layer in self.layers:
            layer.resize(new_slots, new_columns, used_rows, used_columns)
        bias = self.bias.new_full((new_slots, new_columns), torch.finfo(self.bias.dtype).min)
        bias[:used_rows, :used_columns] = self.bias[:used_rows, :used_columns]
        self.bias = bias
        self.slots, self.columns = new_slots, new_columns

    def prepare(self, write_columns: torch.Tensor, span: int) -> torch.Tensor:
        """The next forward pass writes row ``b`` at ``write_columns[b]``, which it opens, and
        attends ``span`` columns: its additive attention mask (B, 1, 1, span)."""
        self.write_columns = write_columns
        self.span = span
        self._index = {}
        rows = write_columns.shape[0]
        self.bias[:rows].scatter_(1, write_columns[:, None], 0.0)
        return self.bias[:rows, None, None, :span]

    def write_index(self, heads: int) -> torch.Tensor:
        """Where row ``b``'s head ``h`` writes in a layer's flattened keys, at ``b * heads + h``
        (B * heads,); built once per step and number of heads, for every layer."""
        index = self._index.get(heads)
        if index is None:
            rows = self.write_columns.shape[0]
            device = self.write_columns.device
            first = torch.arange(rows * heads, device=device).view(rows, heads) * self.columns
            index = (first + self.write_columns[:, None]).view(-1)
            self._index[heads] = index
        return index

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor, columns: int) -> None:
        """Copy rows ``src`` to rows ``dst`` over the first ``columns`` columns (read before any
        is written, so the two may overlap)."""
        for layer in self.layers:
            assert layer.keys is not None and layer.values is not None
            layer.keys[dst, :, :columns] = layer.keys[src, :, :columns]
            layer.values[dst, :, :columns] = layer.values[src, :, :columns]
        self.bias[dst] = self.bias[src]

    def write_rows(self, dst: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]],
                   seen: torch.Tensor) -> None:
        """Write each layer's (keys, values) (N, H, T, D) into rows ``dst``, columns 0 to T, of
        which the rows see those ``seen`` marks (N, T) (their prompts, left-padded)."""
        for layer, (keys, values) in zip(self.layers, layers, strict=True):
            assert layer.keys is not None and layer.values is not None
            width = keys.shape[2]
            layer.keys[dst, :, :width] = keys
            layer.values[dst, :, :width] = values
        bias = self.bias.new_full((dst.shape[0], self.columns), torch.finfo(self.bias.dtype).min)
        bias[:, : seen.shape[1]].masked_fill_(seen.bool(), 0.0)
        self.bias[dst] = bias
