"""A small chat's latency from one key while another key floods, one FIFO queue against fair
shares, side by side in one run on one model.

    python bench/fair_share.py [--model DIR] [--flood 16] [--n 8] [--flood-tokens 256]
                               [--chats 8] [--chat-tokens 8] [--batch 32] [--rounds 1]

Key A keeps ``--flood`` requests of ``n`` choices x ``--flood-tokens`` tokens in the engine
(closed loop: each one that ends is sent again); key B asks ``--chats`` small chats one after
another. Printed: B's p50 and max latency (whole answer) and A's tokens/s, with the engine's
``fair_share`` off (one FIFO queue, the whole batch to whoever came first, as before) and on
(round robin by key, ``max_batch_share``), and the ratio. The transformers engine in its own
process, as ``flywheel serve`` runs it on CPU; without ``--model`` the tiny demo model is built
in a temporary directory (seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engines.base import SamplingParams
from server.engines.transformers_engine import TransformersEngine

FLOOD_PROMPT = "Spell the word river."
CHAT_PROMPT = "Hello!"


async def _flood(engine: TransformersEngine, args: argparse.Namespace, stop: asyncio.Event,
                 tokens: list[int]) -> None:
    prompt = engine.encode_chat([{"role": "user", "content": FLOOD_PROMPT}])
    params = SamplingParams(max_tokens=args.flood_tokens, n=args.n)

    async def loop(i: int) -> None:
        while not stop.is_set():
            async for delta in engine.generate(prompt, params, f"a{i}", tenant="key-a"):
                tokens[0] += len(delta.token_ids)

    workers = [asyncio.ensure_future(loop(i)) for i in range(args.flood)]
    await stop.wait()
    for worker in workers:
        worker.cancel()
    await asyncio.gather(*workers, return_exceptions=True)


async def _chats(engine: TransformersEngine, args: argparse.Namespace) -> list[float]:
    prompt = engine.encode_chat([{"role": "user", "content": CHAT_PROMPT}])
    params = SamplingParams(max_tokens=args.chat_tokens)
    latencies = []
    for i in range(args.chats):
        started = time.perf_counter()
        async for _ in engine.generate(prompt, params, f"b{i}", tenant="key-b"):
            pass
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.1)  # a person reading the answer
    return latencies


async def _measure(engine: TransformersEngine, args: argparse.Namespace
                   ) -> tuple[list[float], float]:
    stop, tokens = asyncio.Event(), [0]
    flood = asyncio.ensure_future(_flood(engine, args, stop, tokens))
    await asyncio.sleep(args.warmup)  # the flood fills the batch and the queue first
    started, before = time.perf_counter(), tokens[0]
    latencies = await _chats(engine, args)
    rate = (tokens[0] - before) / (time.perf_counter() - started)
    stop.set()
    await flood
    return latencies, rate


def run(model: Path, fair: bool, args: argparse.Namespace) -> tuple[list[float], float]:
    engine = TransformersEngine(str(model), device="cpu", max_batch_size=args.batch,
                                ignore_eos=True, own_process=True, fair_share=fair)

    async def go() -> tuple[list[float], float]:
        await engine.start()
        try:
            return await _measure(engine, args)
        finally:
            await engine.stop(drain_timeout_s=0.0)

    return asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--flood", type=int, default=16, help="key A's requests in flight")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--flood-tokens", type=int, default=256)
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--chat-tokens", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of flood before B")
    parser.add_argument("--rounds", type=int, default=1, help="off/on pairs, alternating order")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from flywheel.demo_model import build_demo_model

            model = Path(tmp) / "tiny"
            build_demo_model(model, preset="tiny", seed=0, progress=False)
        results: dict[bool, list[tuple[list[float], float]]] = {False: [], True: []}
        for r in range(args.rounds):
            for fair in ((False, True) if r % 2 == 0 else (True, False)):
                results[fair].append(run(model, fair, args))
    print(f"key A: {args.flood} requests x n={args.n} x {args.flood_tokens} tokens in flight; "
          f"key B: {args.chats} chats of {args.chat_tokens} tokens; batch {args.batch}")
    p50 = {}
    for fair, label in ((False, "one FIFO queue (fair_share off)"), (True, "fair share")):
        latencies = [x for lat, _ in results[fair] for x in lat]
        rate = statistics.mean(r for _, r in results[fair])
        p50[fair] = statistics.median(latencies)
        print(f"  {label:34s} B p50 {p50[fair] * 1000:8.0f} ms  max {max(latencies) * 1000:8.0f}"
              f" ms   A {rate:7.0f} tokens/s")
    print(f"  B's p50, FIFO / fair: {p50[False] / p50[True]:.1f}x")


if __name__ == "__main__":
    main()
