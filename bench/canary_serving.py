"""Serving with a canary beside the active policy, against serving the active policy alone.

    python bench/canary_serving.py [--model DIR] [--clients 16] [--fraction 0.2]
                                   [--max-tokens 64] [--seconds 10] [--rounds 2] [--own-process]
                                   [--canary-weights all|layers]

One ``TransformersEngine`` on one model (its core in this process, or in an engine process of its
own with ``--own-process``); ``--clients`` closed-loop streaming clients send requests back to
back. Rounds alternate between (A) no canary and (B) a canary (a perturbed copy of the model: noise
on every weight, or with ``--canary-weights layers`` on the decoder layers' linear weights only,
what the trainer's merged LoRA adapters change; loaded with ``set_canary`` before the round and
ended after it) receiving ``--fraction`` of the requests, chosen per request with a seeded
generator, so that background load hits both alike. Prints tokens/s, CPU per token (this process
and the engine process: what holds however much CPU other jobs leave), the process's resident
memory (RSS, sampled during each round; (A)'s from the first round, before any canary was loaded)
and the ratios B/A.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import QUESTIONS, Run, conversations, cpu_per_token, cpu_seconds, ensure_model, report

from server.engines.base import SamplingParams
from server.engines.transformers_engine import TransformersEngine


def rss_mib() -> float:
    """Resident memory of this process (Linux ``/proc``), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def perturbed_copy(src: Path, dst: Path, seed: int = 1, layers_only: bool = False) -> Path:
    """The model with noise added to every weight (``layers_only``: to the decoder layers' linear
    weights, as a merged all-linear LoRA adapter): a canary as a new policy would be."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(src)
    generator = torch.Generator().manual_seed(seed)
    params = ([m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
              if layers_only else list(model.parameters()))
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator) * 0.02 * p.std())
    model.save_pretrained(dst)
    return dst


async def clients_round(engine: TransformersEngine, prompts: list[list[int]], clients: int,
                        fraction: float, max_new: int, seconds: float, seed: int
                        ) -> tuple[Run, float, dict[str, int]]:
    """Closed-loop streaming clients for ``seconds``: the run, peak RSS and tokens per version."""
    params = SamplingParams(max_tokens=max_new, temperature=1.0)
    rng = random.Random(seed)
    run, peak, by_version = Run(), rss_mib(), {}
    cpu = cpu_seconds(os.getpid())
    start = time.perf_counter()

    async def client(c: int) -> None:
        r = 0
        while time.perf_counter() - start < seconds:
            canary = rng.random() < fraction
            sent, first = time.perf_counter(), True
            async for delta in engine.generate(prompts[(c + r) % len(prompts)], params,
                                               f"b{c}-{r}", canary=canary):
                if first:
                    run.ttft.append(time.perf_counter() - sent)
                    first = False
                run.tokens += len(delta.token_ids)
                by_version[delta.policy_version] = (by_version.get(delta.policy_version, 0)
                                                    + len(delta.token_ids))
            r += 1

    async def sample_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mib())
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample_rss())
    await asyncio.gather(*(client(c) for c in range(clients)))
    run.seconds = time.perf_counter() - start
    run.cpu, run.cpu_api = (after - before for after, before in
                            zip(cpu_seconds(os.getpid()), cpu, strict=True))
    sampler.cancel()
    return run, max(peak, rss_mib()), by_version


async def bench(model: Path, canary_dir: Path, args: argparse.Namespace) -> None:
    engine = TransformersEngine(str(model), max_batch_size=max(32, args.clients),
                                own_process=args.own_process)
    await engine.start()
    prompts = [engine.encode_chat(c) for c in conversations(len(QUESTIONS))]
    await clients_round(engine, prompts, args.clients, 0.0, args.max_tokens, 1.0, 0)  # warm-up
    runs = {"A": Run(), "B": Run()}
    peaks = {"A": 0.0, "B": 0.0}
    tokens_by_version: dict[str, int] = {}
    rss_before = rss_loaded = 0.0
    for round_ in range(args.rounds):
        for arm, fraction in (("A", 0.0), ("B", args.fraction)):
            if arm == "B":
                rss_before = rss_before or rss_mib()
                await engine.set_canary(str(canary_dir), "canary")
                rss_loaded = rss_loaded or rss_mib()
            run, peak, by_version = await clients_round(
                engine, prompts, args.clients, fraction, args.max_tokens, args.seconds, round_)
            runs[arm].add(run)
            if arm == "B":
                peaks["B"] = max(peaks["B"], peak)
                for version, n in by_version.items():
                    tokens_by_version[version] = tokens_by_version.get(version, 0) + n
                await engine.end_canary()
            elif round_ == 0:  # later (A) rounds follow a freed canary, whose pages the
                peaks["A"] = peak  # allocator may keep: only the first is clean
    await engine.stop()
    alone, shared = runs["A"], runs["B"]
    report(f"(A) {args.clients} streaming clients, no canary", alone)
    report(f"(B) {args.clients} streaming clients, {args.fraction:.0%} on a canary", shared)
    canary_share = tokens_by_version.get("canary", 0) / max(1, shared.tokens)
    print(f"    the canary produced {canary_share:.1%} of (B)'s tokens")
    print(f"    (B)/(A) tokens/s = {shared.rate / alone.rate:.2f}x")
    print(f"CPU: (A) {cpu_per_token(alone)}, (B) {cpu_per_token(shared)}")
    print(f"    (A)/(B) tokens per CPU second = "
          f"{(alone.cpu / alone.tokens) / (shared.cpu / shared.tokens):.2f}x")
    print(f"RSS: {rss_before:.0f} MiB before the first canary, {rss_loaded:.0f} MiB with it "
          f"loaded; peak during (A) {peaks['A']:.0f} MiB, during (B) {peaks['B']:.0f} MiB")
    print(f"    (B)/(A) peak RSS = {peaks['B'] / peaks['A']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".flywheel/models/base"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="per round and arm")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--own-process", action="store_true",
                        help="the engine's core in a process of its own (RSS: this one's only)")
    parser.add_argument("--canary-weights", choices=["all", "layers"], default="all",
                        help="the weights the canary's noise changes (layers: a LoRA policy's)")
    args = parser.parse_args()
    model = ensure_model(args.model.resolve())
    print(f"model {model}, max_tokens {args.max_tokens}, {args.rounds} rounds of "
          f"{args.seconds:.0f}s per arm, core {'in its own' if args.own_process else 'in this'} "
          "process")
    print(f"canary: noise on {'every weight' if args.canary_weights == 'all' else 'the layers'}")
    with tempfile.TemporaryDirectory(prefix="flywheel-canary-") as tmp:
        canary_dir = perturbed_copy(model, Path(tmp) / "canary",
                                    layers_only=args.canary_weights == "layers")
        asyncio.run(bench(model, canary_dir, args))


if __name__ == "__main__":
    main()
