"""One forward pass over several models of one architecture, each row on its own model's weights.

A routed model is a copy of the first model's module tree (sharing its tensors) in which every
module that holds weights (``Linear``, ``Embedding``) is a ``_Routed`` module: the batch's rows
come in runs, one run per model in order, and it calls each model's own module on its run (a
norm, whose weights are vectors, runs once over all rows, each with its own model's vectors:
``_RowScaled``). Everything without weights (attention over the cache, masks, RoPE) runs once
for all rows, so a canary beside the active policy costs one forward pass per step instead of
two (multi-LoRA serving does the same with adapters: S-LoRA, vLLM's punica kernels). No weight
is copied: the routed model holds the models' modules. A weight module whose weights are equal in
every model (a policy trained with LoRA adapters on its decoder's linear layers, merged, keeps
the base's embeddings, tied output layer and norms) is not routed: the first model's runs once
over all rows. A linear layer where every other model's weight is the first's plus a low-rank
difference known from the models' LoRA adapters (``adapters.py``) is a ``_LowRankRouted``: the
first model's product over all rows, then each other model's rows through its difference's two
thin products (a canary beside the active LoRA policy: one base product per layer, as
multi-LoRA servers run adapters).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Hashable
from typing import Any

import torch
import torch.nn.functional as F

from server.engines.adapters import LowRank, adapter_of, difference, explains
from server.engines.cpu_linear import PackedLinear

NAME_KEYS = frozenset({"_name_or_path", "name_or_path", "transformers_version"})
LINEAR_TYPES = (torch.nn.Linear, PackedLinear)  # what ``_LowRankRouted`` can run as its head


class RowRuns:
    """How many rows, in order, belong to each model in the next forward pass."""

    def __init__(self, count: int, device: torch.device) -> None:
        self.count = count
        self.device = device
        self.total = 0
        self.busy: list[int] = []  # the models with rows
        self.models = torch.zeros(0, dtype=torch.long, device=device)  # (B,) each row's model
        self.sizes: list[int] = []
        self.bounds: list[tuple[int, int]] = []  # each model's rows: [start, stop)
        self.version = 0  # changes with ``sizes``: what modules derived from them is stale
        self._last: tuple[torch.Tensor | None, tuple[torch.Tensor, ...]] = (None, ())

    def set(self, sizes: list[int]) -> None:
        assert len(sizes) == self.count
        if sizes == self.sizes:
            return  # most steps: only a join or a finished row changes the runs
        self.sizes, self.version = list(sizes), self.version + 1
        self.busy = [index for index, size in enumerate(sizes) if size]
        self.total = sum(sizes)
        starts = [sum(sizes[:index]) for index in range(len(sizes))]
        self.bounds = [(start, start + size) for start, size in zip(starts, sizes, strict=True)]
        self.models = torch.repeat_interleave(torch.arange(self.count), torch.tensor(sizes)).to(
            self.device)
        self._last = (None, ())

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x``'s runs of rows (views), one per model; the same views for the same ``x``, which
        the query, key and value projections (or gate and up) all get."""
        last, runs = self._last
        if x is not last:
            runs = x.split(self.sizes)
            self._last = (x, runs)
        return runs


class NotRoutableError(RuntimeError):
    """A weight module got input whose first axis is not the batch's rows."""


class _Routed(torch.nn.Module):
    """Each run of rows through its own model's module (parameters as ``parts``' own)."""

    def __init__(self, parts: list[torch.nn.Module], runs: RowRuns) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)
        self._runs = [runs]  # in a list: a plain attribute, not a submodule
        # nn.Linear's forward is F.linear: called directly, one Python frame less per call.
        self._forwards = [functools.partial(F.linear, weight=part.weight, bias=part.bias)
                          if type(part) is torch.nn.Linear else part.forward for part in parts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runs = self._runs[0]
        if x.shape[0] != runs.total:
            raise NotRoutableError(f"{type(self.parts[0]).__name__} got {x.shape[0]} rows, "
                                   f"not the batch's {runs.total}")
        forwards, rows = self._forwards, runs.split(x)
        return torch.cat([forwards[index](rows[index]) for index in runs.busy])

    # Called once per weight module and step, each call one small matmul on CPU: the hooks of
    # ``Module.__call__`` (none are set on these modules) would cost as much again.
    __call__ = forward


class _LowRankRouted(torch.nn.Module):
    """The first model's linear layer over all rows, then each other model's rows plus their
    ``x @ down.T @ up.T``: that model's weight less the first's (``adapters.difference``)."""

    def __init__(self, head: torch.nn.Module, deltas: list[LowRank | None],
                 runs: RowRuns) -> None:
        super().__init__()
        self.head = head
        self._runs = [runs]
        # Transposed once: (in, r) and (r, out), so a step runs ``mm`` and ``addmm_`` alone.
        self._factors = [None if d is None else (d.down.t().contiguous(), d.up.t().contiguous())
                         for d in deltas]
        self._forward = (functools.partial(F.linear, weight=head.weight, bias=head.bias)
                         if type(head) is torch.nn.Linear else head.forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runs = self._runs[0]
        if x.shape[0] != runs.total:
            raise NotRoutableError(f"{type(self.head).__name__} got {x.shape[0]} rows, "
                                   f"not the batch's {runs.total}")
        y = self._forward(x)  # (B, ..., out): each other model's rows added to in place
        if not y.is_contiguous():
            y = y.contiguous()
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        width = flat_y.shape[0] // runs.total  # positions per row (1 in a decode step)
        for index in runs.busy:
            factors = self._factors[index]
            if factors is not None:
                start, stop = runs.bounds[index]
                rows = slice(start * width, stop * width)
                flat_y[rows].addmm_(torch.mm(flat_x[rows], factors[0]), factors[1])
        return y

    __call__ = forward


class _RowScaled(torch.nn.Module):
    """A module whose weights are vectors over the last axis (a norm's scale and shift): run once
    over all rows with each row's own model's vectors, (B, 1, H), in place of its parameters."""

    def __init__(self, parts: list[torch.nn.Module], runs: RowRuns) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)
        self._runs = [runs]
        self._names = [name for name, _ in parts[0].named_parameters(recurse=False)]
        self._stacked = {name: torch.stack([p._parameters[name] for p in parts])[:, None]
                         for name in self._names}  # (G, 1, H) each: copies of small vectors
        # The module without parameters, given the rows' vectors; in a list, as ``_runs``: not a
        # submodule (``modules()`` lists each of the parts once).
        shadow = copy.copy(parts[0])
        shadow.__dict__ = {**parts[0].__dict__, "_parameters": {}}
        self._shadow = [shadow]
        self._version = -1  # of the runs the shadow's vectors were gathered for

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runs = self._runs[0]
        if x.shape[0] != runs.total:
            raise NotRoutableError(f"{type(self.parts[0]).__name__} got {x.shape[0]} rows, "
                                   f"not the batch's {runs.total}")
        if self._version != runs.version:
            self._version = runs.version
            for name in self._names:  # plain attributes: found before ``Module.__getattr__``
                self._shadow[0].__dict__[name] = self._stacked[name].index_select(0, runs.models)
        return self._shadow[0].forward(x)

    __call__ = forward


def _routed_leaf(parts: list[torch.nn.Module], runs: RowRuns) -> torch.nn.Module:
    """``_RowScaled`` where it computes what ``_Routed`` does (tried on random rows), else
    ``_Routed``."""
    params = [p for _, p in parts[0].named_parameters(recurse=False)]
    if len(parts) < 2 or any(p.dim() != 1 or p.shape != params[0].shape for p in params):
        return _Routed(parts, runs)
    probe = RowRuns(len(parts), runs.device)
    probe.set([1] * len(parts))
    x = torch.randn(len(parts), 3, params[0].shape[0], dtype=params[0].dtype,
                    device=runs.device)
    try:
        alike = torch.allclose(_RowScaled(parts, probe)(x), _Routed(parts, probe)(x))
    except Exception:  # any failure: the scales are not plain per-feature vectors
        alike = False
    return _RowScaled(parts, runs) if alike else _Routed(parts, runs)


def _same_weights(modules: list[torch.nn.Module]) -> bool:
    """Whether ``modules`` are of one type and hold equal parameters (the same tensors, or equal
    values): one of them computes what each would on its own rows."""
    head = modules[0]
    params = dict(head.named_parameters(recurse=False))
    for module in modules[1:]:
        if type(module) is not type(head):
            return False
        own = dict(module.named_parameters(recurse=False))
        if own.keys() != params.keys():
            return False
        for name, p in params.items():
            q = own[name]
            if q is not p and not (q.shape == p.shape and q.dtype == p.dtype
                                   and q.device == p.device and torch.equal(q, p)):
                return False
    return True


def fusion_key(model: Any) -> Hashable | None:
    """Models with equal keys can share a routed forward (same class, configuration and
    parameter shapes); None for a model whose weight modules are not all leaves, or without a
    Hugging Face configuration."""
    if getattr(model, "config", None) is None:
        return None
    for module in model.modules():
        if next(module.children(), None) is not None and next(
                module.parameters(recurse=False), None) is not None:
            return None
    config = {k: v for k, v in model.config.to_dict().items() if k not in NAME_KEYS}
    shapes = tuple((name, tuple(p.shape), str(p.dtype), str(p.device))
                   for name, p in model.named_parameters())
    return type(model), json.dumps(config, sort_keys=True, default=str), shapes


def routed(models: list[Any], runs: RowRuns) -> Any:
    """The routed model over ``models`` (equal ``fusion_key``s), its row runs set in ``runs``."""
    return _route([*models], runs, [adapter_of(m) for m in models], "")


def _route(modules: list[torch.nn.Module], runs: RowRuns,
           adapters: list[dict[str, LowRank]], path: str) -> torch.nn.Module:
    head = modules[0]
    if next(head.parameters(recurse=False), None) is not None:
        if _same_weights(modules):
            return head
        deltas = _low_rank_deltas(modules, [a.get(path) for a in adapters])
        return (_LowRankRouted(head, deltas, runs) if deltas is not None
                else _routed_leaf(modules, runs))
    clone = copy.copy(head)
    clone.__dict__ = head.__dict__.copy()
    clone._modules = {
        name: None if child is None else _route([m._modules[name] for m in modules], runs,
                                                adapters, f"{path}.{name}" if path else name)
        for name, child in head._modules.items()
    }
    return clone


def _low_rank_deltas(modules: list[torch.nn.Module],
                     factors: list[LowRank | None]) -> list[LowRank | None] | None:
    """Each linear layer's weight less the first's as a low-rank product from the adapters
    (None where equal), when the adapters explain every weight; else None."""
    head = modules[0]
    if type(head) not in LINEAR_TYPES or any(type(m) is not type(head) for m in modules):
        return None
    biases = [m.bias for m in modules]
    if any((b is None) != (biases[0] is None) or (b is not None and not torch.equal(b, biases[0]))
           for b in biases):
        return None  # their biases differ
    deltas = [None, *(difference(factors[0], f) for f in factors[1:])]
    try:
        explained = all(explains(m.weight, head.weight, delta)
                        for m, delta in zip(modules[1:], deltas[1:], strict=True))
    except RuntimeError:  # factors that do not fit the weights: served as full weights
        explained = False
    return deltas if explained else None


Routing = tuple[RowRuns, Any]  # a routed model over some models, and its row runs


@torch.inference_mode()  # as on the decode thread: the probe records no autograd graph
def route(models: list[Any]) -> Routing | None:
    """The routed model over ``models`` (equal ``fusion_key``s) with its runs, when it gives each
    row its own model's logits (``routes_alike``); else None. Costs a pass over every weight
    that differs between the models (``adapters.explains``: a LoRA canary's deltas, on a 80M
    model 0.3 s of CPU) and a probe forward: done where the newest model is loaded, not between
    two decode steps (``Probed``)."""
    runs = RowRuns(len(models), models[0].device)
    model = routed(models, runs)
    return (runs, model) if routes_alike(model, runs, models) else None


class Probed:
    """A model's ``route`` beside lanes' members (``(*members, model)``), probed off the decode
    thread before its group exists, so that placing the group in a lane probes nothing."""

    def __init__(self, model: Any, key: Hashable | None, members: list[list[Any]]) -> None:
        """``key``: ``model``'s ``fusion_key``; ``members``: the models of each lane of that key
        (and of each group of that key not yet in a lane, alone)."""
        self.key = key
        self._routes: list[tuple[tuple[Any, ...], Routing | None]] = [
            ((*models, model), route([*models, model])) for models in members]

    def route(self, models: list[Any]) -> Routing | None:
        """``route(models)``: as probed, where these were probed (the same objects), else now."""
        for probed, routing in self._routes:
            if len(probed) == len(models) and all(
                    a is b for a, b in zip(probed, models, strict=True)):
                return routing
        return route(models)

    def keep(self, alive: list[Any]) -> None:
        """Forget the probes of members that are not in ``alive`` (freed models): they will not
        be asked for, and their routed models hold those models' weights."""
        ids = {id(model) for model in alive}
        self._routes = [(probed, routing) for probed, routing in self._routes
                        if all(id(model) in ids for model in probed[:-1])]


def routes_alike(model: Any, runs: RowRuns, parts: list[Any]) -> bool:
    """Whether ``model`` (routed over ``parts``) gives each row its own part's logits: a probe
    of one short row per part, against each part alone; False for an architecture whose weight
    modules see other than the batch's rows (a broadcast position embedding, mixtures of
    experts)."""
    ids = torch.tensor([[1, 2, 3, 4]], device=parts[0].device)
    try:
        alone = torch.cat([part(input_ids=ids, use_cache=False).logits for part in parts])
        runs.set([1] * len(parts))
        together = model(input_ids=ids.expand(len(parts), -1), use_cache=False).logits
    except Exception:  # any failure to route is a reason not to
        return False
    scale = float(alone.abs().max()) or 1.0
    tolerance = 1e-4 if alone.dtype == torch.float32 else 2e-2
    return bool(((together - alone).abs().max() <= tolerance * scale).item())
