"""A decode step's CPU time through a routed model over two versions, against one version alone.

    python bench/routed_step.py [--sizes 13/3 8/8] [--cycles 40] [--canary-weights all|layers]

A randomly initialised Llama of the demo model's shape (4 layers of 128, MLP 384, 2,048 tokens,
tied embeddings, oneDNN-packed where ``cpu_linear.py`` packs) and a perturbed copy (every weight, or
the decoder layers' linear weights only, as a merged LoRA policy), one intra-op thread as the
engine's decode thread. 16-step blocks of one model and of the routed model (rows split as
``--sizes``) alternate, so background load hits both alike; prints the routed / one ratio of the
decode thread's CPU time (``time.thread_time``, which holds however much CPU other jobs leave).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engines.batch import PaddedBatch
from server.engines.cpu_linear import pack_linears
from server.engines.routing import RowRuns, routed
from server.engines.slot_batch import SlotBatch

DEMO = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
        "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 2048}


def models(layers_only: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    config = LlamaConfig(tie_word_embeddings=True, max_position_embeddings=512, **DEMO)
    torch.manual_seed(0)
    active, canary = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    canary.load_state_dict(active.state_dict())
    params = ([m.weight for m in canary.model.layers.modules() if isinstance(m, torch.nn.Linear)]
              if layers_only else list(canary.parameters()))
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.02 * (p.std() if p.numel() > 1 else 1.0))
    return pack_linears(active), pack_linears(canary)


def block(model: torch.nn.Module, rows: int, steps: int = 16) -> float:
    """CPU seconds of ``steps`` decode steps of ``rows`` rows after a prefill (not counted)."""
    prompts = [[5 + i, 6, 7, 8, 9, 10, 11, 12] for i in range(rows)]
    batch, logits = PaddedBatch.prefill(model, prompts, pad_id=0)
    slots = SlotBatch.adopt(batch)
    slots.tokens = logits.argmax(-1, keepdim=True)
    slots.tokens = slots.decode(model).argmax(-1, keepdim=True)
    start = time.thread_time()
    for _ in range(steps):
        slots.tokens = slots.decode(model).argmax(-1, keepdim=True)
    return time.thread_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["13/3", "8/8"])
    parser.add_argument("--cycles", type=int, default=40)
    parser.add_argument("--canary-weights", choices=["all", "layers"], default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    active, canary = models(args.canary_weights == "layers")
    runs = RowRuns(2, torch.device("cpu"))
    both = routed([active, canary], runs)
    with torch.inference_mode():
        for text in args.sizes:
            sizes = [int(n) for n in text.split("/")]
            runs.set(sizes)
            one = shared = 0.0
            for _ in range(args.cycles):
                one += block(active, sum(sizes))
                shared += block(both, sum(sizes))
            steps = args.cycles * 16
            print(f"rows {text}: one {one / steps * 1e3:.2f} ms, routed {shared / steps * 1e3:.2f}"
                  f" ms CPU per step: routed / one = {shared / one:.3f}x", flush=True)


if __name__ == "__main__":
    main()
