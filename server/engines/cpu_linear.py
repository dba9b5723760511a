"""Linear layers through oneDNN with their weights packed once, for float32 serving on CPU.

``nn.Linear`` runs on CPU through the BLAS torch was built with (MKL). On the development
machine's AMD EPYC cores a decode step's products (4 to 400 rows through a 512 x 1536 weight)
run 2.2 to 2.9x faster in oneDNN with the weight reordered once into its blocked layout (what
vLLM's CPU backend and torch.compile's CPU freezing do); a 28M Llama's decode step at 16 rows
takes 20 instead of 30 ms. oneDNN costs about 10 us more per call, which small weights do not
earn back (the demo model's 128 x 384 ones: even at 16 rows, 3x slower at one), so only weights
of ``MIN_WEIGHT`` elements or more are packed. The model's parameters stay where they were
(fusion keys, routing and probes read them); the packed copies cost those weights' memory again.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

MIN_WEIGHT = 1 << 18  # elements: 512 x 512, or the demo model's 128 x 2048 output layer


class PackedLinear(torch.nn.Module):
    """``linear``'s product through oneDNN with its weight packed; its parameters kept."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self._bias = linear.bias.detach() if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self._bias, "none", [], "")


def pack_linears(model: Any) -> Any:
    """``model`` with every ``nn.Linear`` of ``MIN_WEIGHT`` elements or more a ``PackedLinear``
    where that is possible (CPU, float32, oneDNN available) and gives the same logits as before
    on a probe; else unchanged."""
    if not _available(model):
        return model
    swapped = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children()
               if type(child) is torch.nn.Linear and child.weight.numel() >= MIN_WEIGHT]
    if not swapped:
        return model
    ids = torch.tensor([[1, 2, 3, 4, 5]], device=model.device)
    with torch.inference_mode():
        before = model(input_ids=ids, use_cache=False).logits
    try:
        for parent, name, child in swapped:
            setattr(parent, name, PackedLinear(child))
        with torch.inference_mode():
            after = model(input_ids=ids, use_cache=False).logits
        scale = float(before.abs().max()) or 1.0
        if float((after - before).abs().max()) <= 1e-4 * scale:
            return model
    except Exception:  # any failure: the plain layers serve
        logger.debug("oneDNN linear layers unavailable", exc_info=True)
    for parent, name, child in swapped:
        setattr(parent, name, child)
    return model


def _available(model: Any) -> bool:
    return (getattr(model, "device", None) is not None and model.device.type == "cpu"
            and getattr(model, "dtype", None) == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
