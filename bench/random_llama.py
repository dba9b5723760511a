"""A randomly initialised Llama with the demo model's tokenizer, for serving benchmarks on a model
larger than the demo's (its weights do not matter to the speed of a forward pass).

    python bench/random_llama.py --tokenizer DEMO_MODEL_DIR --out DIR [--size 28m|80m]

``28m``: 8 layers of 512 wide, 8 heads of 64, MLP 1536, tied embeddings: 28.3M parameters,
112 MB in float32 (the "28M model" of docs/benchmarks.md). ``80m``: 6 layers of 1024 wide, 16
heads of 64, MLP 2816: 79M parameters, where a layer's weights are four times the 28M model's
(what a LoRA canary's thin products cost depends on the width, docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

SIZES = {"28m": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
                 "num_attention_heads": 8, "num_key_value_heads": 8},
         "80m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 6,
                 "num_attention_heads": 16, "num_key_value_heads": 16}}


def build(tokenizer_dir: Path, out: Path, size: str) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, **SIZES[size], **ids)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    GenerationConfig(**ids).save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters in {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=Path(".flywheel/models/base"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="28m")
    args = parser.parse_args()
    build(args.tokenizer, args.out, args.size)


if __name__ == "__main__":
    main()
