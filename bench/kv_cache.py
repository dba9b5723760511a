"""The slot KV cache against transformers' ``DynamicCache``, the engine's two decode batches, on one
model in one process: decode steps per CPU second.

    python bench/kv_cache.py [--model DIR] [--rows 16] [--rounds 5]

Two loads, each run on both batches in turn (every other round in reverse order), greedy on
random prompts of 15 to 39 tokens: ``steady``, ``--rows`` rows decoding 48 steps together, and
``churn``, 200 steps where each row leaves after 8 to 63 tokens and new rows join in groups once
four have left or every fourth step (as the scheduler joins them), which copies rows in and out
of the cache every few steps. Tokens are counted per CPU second of this thread (other load on a
shared machine moves wall-clock rates more), medians of the rounds. The model's linear layers
are as the engine loads them (``load_model``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engines.batch import PaddedBatch
from server.engines.model_loading import load_model
from server.engines.slot_batch import SlotBatch

STEADY_STEPS, CHURN_STEPS = 48, 200


class Load:
    """Random prompts and answer lengths from one seed, the same for both batches."""

    def __init__(self, vocab: int, seed: int) -> None:
        self.rng, self.vocab = random.Random(seed), vocab

    def prompts(self, count: int) -> list[list[int]]:
        return [[self.rng.randrange(self.vocab) for _ in range(self.rng.randrange(15, 40))]
                for _ in range(count)]

    def budgets(self, count: int) -> list[int]:
        return [self.rng.randrange(8, 64) for _ in range(count)]


def _batch(model: Any, kind: str, prompts: list[list[int]]) -> SlotBatch | PaddedBatch:
    batch, logits = PaddedBatch.prefill(model, prompts, 0)
    batch.tokens = logits.argmax(dim=-1)[:, None]
    return SlotBatch.adopt(batch) if kind == "slot" else batch


def steady(model: Any, kind: str, rows: int, seed: int) -> float:
    batch = _batch(model, kind, Load(model.config.vocab_size, seed).prompts(rows))
    start = time.thread_time()
    for _ in range(STEADY_STEPS):
        batch.tokens = batch.decode(model).argmax(dim=-1)[:, None]
    return STEADY_STEPS * rows / (time.thread_time() - start)


def churn(model: Any, kind: str, rows: int, seed: int) -> float:
    load = Load(model.config.vocab_size, seed)
    batch, left = _batch(model, kind, load.prompts(rows)), load.budgets(rows)
    tokens, waiting, start = 0, 0, time.thread_time()
    for step in range(CHURN_STEPS):
        batch.tokens = batch.decode(model).argmax(dim=-1)[:, None]
        tokens += len(left)
        left = [n - 1 for n in left]
        keep = [i for i, n in enumerate(left) if n > 0]
        if len(keep) < len(left):
            waiting += len(left) - len(keep)
            batch.select(keep)
            left = [left[i] for i in keep]
        if waiting >= 4 or (waiting and step % 4 == 0):
            joining, logits = PaddedBatch.prefill(model, load.prompts(waiting), 0)
            joining.tokens = logits.argmax(dim=-1)[:, None]
            batch.merge(joining)
            left += load.budgets(waiting)
            waiting = 0
    return tokens / (time.thread_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".flywheel/models/base"))
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the engine's decode thread on a 2-core machine
    model = load_model(str(args.model), torch.device("cpu"), torch.float32)
    rates: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for r in range(args.rounds):
            for kind in ("padded", "slot")[:: 1 if r % 2 == 0 else -1]:
                for name, run in (("steady", steady), ("churn", churn)):
                    rates.setdefault((name, kind), []).append(run(model, kind, args.rows, r))
    print(f"model {args.model}, {args.rows} rows, {args.rounds} rounds, tokens per CPU second")
    for name in ("steady", "churn"):
        padded = statistics.median(rates[(name, "padded")])
        slot = statistics.median(rates[(name, "slot")])
        print(f"  {name:6s} DynamicCache {padded:7.0f}  slot cache {slot:7.0f}  "
              f"ratio {slot / padded:.2f}x")


if __name__ == "__main__":
    main()
