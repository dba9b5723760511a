"""A KV cache of preallocated rows written in place: one row per running sequence.

Every layer holds keys and values of shape (slots, heads, columns, head_dim), allocated ahead and
grown by doubling. Row ``b`` of the decode batch owns slot ``b``; its tokens fill columns
``starts[b]`` to ``ends[b] - 1`` and a decode step writes the next one at ``ends[b]``, so a step
copies one position per row instead of the whole history (``DynamicCache`` concatenates every
layer's keys and values at every token). Attention runs over the first ``span`` columns, with a
mask (``SlotBatch.decode``) that hides each row's columns outside its own.

The model's attention modules call ``update`` with the new keys and values, as with any
``transformers`` ``Cache``; the mask is passed in 4D, which ``transformers`` uses as it is.
"""

from __future__ import annotations

import functools
import inspect
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
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one new position per row (B, H, 1, D) at its row's column; the rows' keys and
        values over the attended span, (B, H, span, D) views."""
        assert self.keys is not None and self.values is not None
        owner = self._owner
        rows = key_states.shape[0]
        keys, values = self.keys[:rows], self.values[:rows]
        keys.scatter_(2, owner.write_index(key_states), key_states)
        values.scatter_(2, owner.write_index(value_states), value_states)
        return keys[:, :, : owner.span], values[:, :, : owner.span]

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


class SlotCache(Cache):
    """The layers' slot tensors and the columns the next forward pass writes and reads."""

    def __init__(self, layers: int) -> None:
        super().__init__(layers=[SlotLayer(self) for _ in range(layers)])
        self.slots = 0
        self.columns = 0
        self.span = 0  # columns attended in the next forward pass
        self.write_columns = torch.zeros(0, dtype=torch.long)  # (B,) where each row writes
        self._index: dict[tuple[int, ...], torch.Tensor] = {}

    def allocate(self, like: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give every layer empty tensors of the heads, head size, dtype and device of ``like``
        (one (keys, values) pair per layer, e.g. a prefill's cache)."""
        for layer, (keys, values) in zip(self.layers, like, strict=True):
            layer.lazy_initialization(keys, values)

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
        self.slots, self.columns = new_slots, new_columns

    def prepare(self, write_columns: torch.Tensor, span: int) -> None:
        """The next forward pass writes row ``b`` at ``write_columns[b]`` and attends ``span``."""
        self.write_columns = write_columns
        self.span = span
        self._index = {}

    def write_index(self, states: torch.Tensor) -> torch.Tensor:
        """``write_columns`` as a scatter index shaped like ``states`` (B, H, 1, D); one per
        shape and step (keys and values of every layer share it)."""
        shape = tuple(states.shape)
        index = self._index.get(shape)
        if index is None:
            index = self.write_columns.view(-1, 1, 1, 1).expand(shape)
            self._index[shape] = index
        return index

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor, columns: int) -> None:
        """Copy rows ``src`` to rows ``dst`` over the first ``columns`` columns (read before any
        is written, so the two may overlap)."""
        for layer in self.layers:
            assert layer.keys is not None and layer.values is not None
            layer.keys[dst, :, :columns] = layer.keys[src, :, :columns]
            layer.values[dst, :, :columns] = layer.values[src, :, :columns]

    def write_rows(self, dst: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]],
                   ) -> None:
        """Write each layer's (keys, values) (N, H, T, D) into rows ``dst``, columns 0 to T."""
        for layer, (keys, values) in zip(self.layers, layers, strict=True):
            assert layer.keys is not None and layer.values is not None
            width = keys.shape[2]
            layer.keys[dst, :, :width] = keys
            layer.values[dst, :, :width] = values


@functools.cache
def cache_keyword(model_class: type) -> str:
    """The keyword a model's forward takes its cache by: ``cache`` from transformers 5.24 on
    (``past_key_values`` is deprecated there, to go in 5.40), ``past_key_values`` before."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
