"""A decode step's CPU time through a routed model over two versions, against one version alone.

    python bench/routed_step.py [--sizes 13/3 8/8] [--cycles 40] [--shape demo|28m|80m]
                                [--canary-weights all|layers|lora]

A randomly initialised Llama of the demo model's shape (4 layers of 128, MLP 384, 2,048 tokens,
tied embeddings; ``--shape 28m``: ``random_llama.py``'s 8 layers of 512, MLP 1536; ``80m``: its
6 layers of 1024, MLP 2816), oneDNN-packed where ``cpu_linear.py`` packs, and a perturbed copy:
noise on every weight, or on the decoder layers' linear weights only (a merged LoRA policy served
as full weights), or ``lora``: both models LoRA policies on that base (rank 16 on every decoder
linear layer, as the trainer writes them) that carry their adapters, so the routed model adds
the canary's low-rank difference to its rows (``adapters.py``). One intra-op thread, as the
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

from server.engines.adapters import LowRank, attach
from server.engines.batch import PaddedBatch
from server.engines.cpu_linear import pack_linears
from server.engines.routing import RowRuns, routed
from server.engines.slot_batch import SlotBatch

SHAPES = {
    "demo": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
             "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 2048},
    "28m": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 2048},
    "80m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 6,
            "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 2048},
}
RANK = 16


def models(shape: str, canary_weights: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    config = LlamaConfig(tie_word_embeddings=True, max_position_embeddings=512, **SHAPES[shape])
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    if canary_weights == "lora":
        return lora_policy(base, config), lora_policy(base, config)
    canary = LlamaForCausalLM(config).eval()
    canary.load_state_dict(base.state_dict())
    params = ([m.weight for m in canary.model.layers.modules() if isinstance(m, torch.nn.Linear)]
              if canary_weights == "layers" else list(canary.parameters()))
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.02 * (p.std() if p.numel() > 1 else 1.0))
    return pack_linears(base), pack_linears(canary)


def lora_policy(base: torch.nn.Module, config: LlamaConfig) -> torch.nn.Module:
    """``base`` plus a random rank-16 adapter on every decoder linear layer, merged, carrying
    the adapter's factors as a loaded LoRA checkpoint does."""
    policy = LlamaForCausalLM(config).eval()
    policy.load_state_dict(base.state_dict())
    factors = {}
    with torch.no_grad():
        for name, module in policy.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):
                down = torch.randn(RANK, module.in_features) / module.in_features ** 0.5
                up = torch.randn(module.out_features, RANK) * 0.02
                module.weight.add_(up @ down)
                factors[f"model.layers.{name}"] = LowRank(down, up)
    return attach(pack_linears(policy), factors)


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
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--canary-weights", choices=["all", "layers", "lora"], default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    active, canary = models(args.shape, args.canary_weights)
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
