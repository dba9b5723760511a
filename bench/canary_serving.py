"""Serving with a canary beside the active policy, against serving the active policy alone.

    python bench/canary_serving.py [--model DIR] [--clients 16] [--fraction 0.2]
                                   [--max-tokens 64] [--seconds 10] [--rounds 2] [--own-process]
                                   [--canary-weights all|layers]
                                   [--engine transformers|vllm] [--canary full|lora] [--vllm-eager]

One ``TransformersEngine`` on one model (its core in this process, or in an engine process of its
own with ``--own-process``); ``--clients`` closed-loop streaming clients send requests back to
back. Rounds alternate between (A) no canary and (B) a canary (a perturbed copy of the model: noise
on every weight, or with ``--canary-weights layers`` on the decoder layers' linear weights only,
what the trainer's merged LoRA adapters change; loaded with ``set_canary`` before the round and
ended after it) receiving ``--fraction`` of the requests, chosen per request with a seeded
generator, so that background load hits both alike. ``--canary lora``: the active policy and
the canary are each a LoRA policy on the model (the trainer's: all linear layers, rank 16, merged
and with the adapter beside, written by its ``save_policy``), which the routed forward serves as
one base product plus each policy's low-rank difference.
A last round (C) loads the canary a second into a round of streaming clients, as a release reaches
a busy server, and prints the longest wait between two deltas of a stream (a stall of the decode
thread shows there; (B)'s rounds start after ``set_canary`` returned, on an idle engine).
Prints tokens/s, CPU per token (this process
and the engine process: what holds however much CPU other jobs leave), the process's resident
memory (RSS, sampled during each round; (A)'s from the first round, before any canary was loaded)
and the ratios B/A: of the rounds' totals, and the median of each round's ratio.

``--engine vllm`` measures Flywheel's ``VLLMEngine`` in this process instead (run with the
interpreter of ``scripts/vllm-venv.sh`` on CPU), with the engine's own settings (on CPU: float32, a
1 GiB KV cache per engine, compiled unless ``--vllm-eager``). ``--canary full``: the active policy
is the model and the canary the perturbed copy above, which ``set_canary`` serves from a second
``AsyncLLM`` (engine core and worker processes of its own, its own KV cache), started before each
(B) round and shut down after it. ``--canary lora``: LoRA on, the active policy and the canary
are each an adapter on the model (the trainer's: all linear layers, rank 16, written by its
``save_policy``), the canary one more adapter in the same engine. Memory is then that of this
process and its children (vLLM's engine processes): RSS summed, and PSS (shared pages split
between the processes that map them) before and with the canary; the canary's start time is
printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import (
    QUESTIONS,
    ROOT,
    Run,
    conversations,
    cpu_per_token,
    cpu_seconds,
    ensure_model,
    report,
)

from server.engines.base import SamplingParams
from server.engines.transformers_engine import TransformersEngine

LOAD_AFTER_S = 1.0  # (C): the canary is loaded this long into a round of streaming clients


def rss_mib() -> float:
    """Resident memory of this process (Linux ``/proc``), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_memory_mib(pss: bool = False) -> float:
    """Resident memory of this process and its children (vLLM's engine cores), MiB: RSS summed,
    which counts shared pages (libraries) once per process, or ``pss``, which splits them."""
    import psutil

    root = psutil.Process()
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss if pss else proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / 2**20


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


async def clients_round(engine: Any, prompts: list[list[int]], clients: int,
                        fraction: float, max_new: int, seconds: float, seed: int,
                        memory: Callable[[], float] = rss_mib,
                        lengths: dict[str, list[int]] | None = None,
                        ) -> tuple[Run, float, dict[str, int], float]:
    """Closed-loop streaming clients for ``seconds``: the run, peak RSS, tokens per version and
    the longest wait between two deltas of a stream (a stall of the decode thread shows there);
    each finished completion's length is appended to ``lengths[version]``.
    Tokens and CPU count up to the deadline, where the requests in flight are cancelled: let
    finish, their tail (the batch draining, seconds on a larger model) would weigh on either arm
    by chance."""
    params = SamplingParams(max_tokens=max_new, temperature=1.0)
    rng = random.Random(seed)
    run, peak, by_version, longest = Run(), memory(), {}, 0.0
    lengths = {} if lengths is None else lengths
    cpu = cpu_seconds(os.getpid())
    start = time.perf_counter()
    deadline = start + seconds

    async def client(c: int) -> None:
        nonlocal longest
        r = 0
        while time.perf_counter() < deadline:
            canary = rng.random() < fraction
            sent, first = time.perf_counter(), True
            last = sent
            stream = engine.generate(prompts[(c + r) % len(prompts)], params, f"b{c}-{r}",
                                     canary=canary)
            version, length, finished = "", 0, True
            async with aclosing(stream):
                async for delta in stream:
                    now = time.perf_counter()
                    if now >= deadline:
                        finished = False
                        break
                    if first:
                        run.ttft.append(now - sent)
                        first = False
                    else:
                        longest = max(longest, now - last)
                    last = now
                    run.tokens += len(delta.token_ids)
                    length += len(delta.token_ids)
                    version = delta.policy_version
                    by_version[version] = by_version.get(version, 0) + len(delta.token_ids)
            if finished and version:
                lengths.setdefault(version, []).append(length)
            r += 1

    async def clock() -> tuple[float, float]:
        await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        return cpu_seconds(os.getpid())

    async def sample_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, memory())
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample_rss())
    at_deadline = asyncio.create_task(clock())
    try:
        await asyncio.gather(*(client(c) for c in range(clients)))
        run.seconds = seconds
        run.cpu, run.cpu_api = (after - before for after, before in
                                zip(await at_deadline, cpu, strict=True))
    finally:
        sampler.cancel()
        at_deadline.cancel()
    return run, max(peak, memory()), by_version, longest


async def bench(engine: Any, canary_dir: Path, args: argparse.Namespace,
                memory: Callable[[], float] = rss_mib,
                pss: Callable[[], float] | None = None) -> None:
    """Rounds of (A) no canary and (B) the canary at ``canary_dir`` on a started ``engine``,
    which is stopped after them; ``pss``: also the PSS before and with the first canary."""
    prompts = [engine.encode_chat(c) for c in conversations(len(QUESTIONS))]
    await clients_round(engine, prompts, args.clients, 0.0, args.max_tokens, 1.0, 0,
                        memory)  # warm-up
    runs = {"A": Run(), "B": Run()}
    per_round: list[tuple[Run, Run]] = []
    peaks = {"A": 0.0, "B": 0.0}
    tokens_by_version: dict[str, int] = {}
    lengths: dict[str, dict[str, list[int]]] = {"A": {}, "B": {}}  # arm: version: lengths
    longest_gap = {"A": 0.0, "B": 0.0}
    rss_before = rss_loaded = pss_before = pss_loaded = 0.0
    canary_starts: list[float] = []
    for round_ in range(args.rounds):
        arms: dict[str, Run] = {}
        for arm, fraction in (("A", 0.0), ("B", args.fraction)):
            if arm == "B":
                rss_before = rss_before or memory()
                pss_before = pss_before or (pss() if pss else 0.0)
                started = time.perf_counter()
                await engine.set_canary(str(canary_dir), "canary")
                canary_starts.append(time.perf_counter() - started)
                rss_loaded = rss_loaded or memory()
                pss_loaded = pss_loaded or (pss() if pss else 0.0)
            run, peak, by_version, longest = await clients_round(
                engine, prompts, args.clients, fraction, args.max_tokens, args.seconds, round_,
                memory, lengths[arm])
            runs[arm].add(run)
            arms[arm] = run
            longest_gap[arm] = max(longest_gap[arm], longest)
            if arm == "B":
                peaks["B"] = max(peaks["B"], peak)
                for version, n in by_version.items():
                    tokens_by_version[version] = tokens_by_version.get(version, 0) + n
                await engine.end_canary()
            elif round_ == 0:  # later (A) rounds follow a freed canary, whose pages the
                peaks["A"] = peak  # allocator may keep: only the first is clean
        per_round.append((arms["A"], arms["B"]))
    under_load, load_took, longest_under_load, canary_share_c = await canary_under_load(
        engine, canary_dir, prompts, args, memory)
    await engine.stop()
    alone, shared = runs["A"], runs["B"]
    report(f"(A) {args.clients} streaming clients, no canary", alone)
    report(f"(B) {args.clients} streaming clients, {args.fraction:.0%} on a canary", shared)
    canary_share = tokens_by_version.get("canary", 0) / max(1, shared.tokens)
    print(f"    the canary produced {canary_share:.1%} of (B)'s tokens")
    print("    mean completion length: " + ", ".join(
        f"({arm}) {version} {statistics.mean(n):.1f} of {len(n)}"
        for arm, by in lengths.items() for version, n in sorted(by.items())))
    print(f"    (B)/(A) tokens/s = {shared.rate / alone.rate:.2f}x")
    print(f"CPU: (A) {cpu_per_token(alone)}, (B) {cpu_per_token(shared)}")
    print(f"    (A)/(B) tokens per CPU second = "
          f"{(alone.cpu / alone.tokens) / (shared.cpu / shared.tokens):.2f}x")
    print(f"RSS: {rss_before:.0f} MiB before the first canary, {rss_loaded:.0f} MiB with it "
          f"loaded; peak during (A) {peaks['A']:.0f} MiB, during (B) {peaks['B']:.0f} MiB")
    print(f"    (B)/(A) peak RSS = {peaks['B'] / peaks['A']:.2f}x")
    if pss is not None:
        print(f"PSS: {pss_before:.0f} MiB before the first canary, {pss_loaded:.0f} MiB with it "
              f"loaded ({pss_loaded / pss_before:.2f}x)")
    rates = [b.rate / a.rate for a, b in per_round]
    per_cpu = [(a.cpu / a.tokens) / (b.cpu / b.tokens) for a, b in per_round]
    print(f"per round ({len(per_round)}): (B)/(A) tokens/s median {statistics.median(rates):.2f}x "
          f"({min(rates):.2f}x to {max(rates):.2f}x), tokens per CPU second median "
          f"{statistics.median(per_cpu):.2f}x ({min(per_cpu):.2f}x to {max(per_cpu):.2f}x)")
    print("    each round's tokens/s " + " ".join(f"{r:.2f}x" for r in rates)
          + ", per CPU second " + " ".join(f"{r:.2f}x" for r in per_cpu))
    print(f"longest wait between two deltas of a stream: (A) {longest_gap['A']:.2f}s, "
          f"(B) {longest_gap['B']:.2f}s")
    print(f"(C) the canary loaded {LOAD_AFTER_S:.0f}s into a round of streaming clients "
          f"(set_canary took {load_took:.2f}s): {under_load.rate:.1f} tok/s, longest wait "
          f"between two deltas of a stream {longest_under_load:.2f}s, the canary's share of "
          f"its tokens {canary_share_c:.1%}"
          + (" (it loaded too late to serve in the round: raise --seconds)"
             if not canary_share_c else ""))
    print(f"canary start (set_canary): median {statistics.median(canary_starts):.2f}s "
          f"({min(canary_starts):.2f}s to {max(canary_starts):.2f}s)")


async def canary_under_load(engine: Any, canary_dir: Path, prompts: list[list[int]],
                            args: argparse.Namespace, memory: Callable[[], float]
                            ) -> tuple[Run, float, float, float]:
    """(C) A round in which the canary is loaded ``LOAD_AFTER_S`` into the round, as a release
    reaches a busy server (canary requests before it run on the active version): the run, how
    long ``set_canary`` took and the longest wait between two deltas of a stream, which shows
    any stall of the decode thread while the canary loads or first joins; and the canary's share
    of the round's tokens (none: it loaded too late to serve in the round, and to be measured)."""

    async def load_later() -> float:
        await asyncio.sleep(LOAD_AFTER_S)
        started = time.perf_counter()
        await engine.set_canary(str(canary_dir), "canary")
        return time.perf_counter() - started

    loading = asyncio.create_task(load_later())
    run, _, by_version, longest = await clients_round(
        engine, prompts, args.clients, args.fraction, args.max_tokens, args.seconds, args.rounds,
        memory)
    took = await loading
    await engine.end_canary()
    return run, took, longest, by_version.get("canary", 0) / max(1, run.tokens)


def policies(model: Path, tmp: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The active policy and the canary: two LoRA policies on ``model`` (``--canary lora``), or
    ``model`` and a perturbed copy of it."""
    if args.canary == "lora":
        return (lora_checkpoint(model, tmp / "active", seed=2),
                lora_checkpoint(model, tmp / "canary", seed=3))
    return model, perturbed_copy(model, tmp / "canary",
                                 layers_only=args.canary_weights == "layers")


async def transformers_bench(model: Path, tmp: Path, args: argparse.Namespace) -> None:
    """The canary on the transformers engine: full weights, or a second LoRA policy beside the
    active one (both carry their adapters: the canary's rows add its low-rank difference)."""
    active, canary_dir = policies(model, tmp, args)
    engine = TransformersEngine(str(active), max_batch_size=max(32, args.clients),
                                own_process=args.own_process, ignore_eos=args.ignore_eos)
    await engine.start()
    await bench(engine, canary_dir, args)


def lora_checkpoint(base: Path, dst: Path, seed: int) -> Path:
    """A LoRA policy on ``base`` as the trainer writes one (``save_policy``: the adapter under
    ``dst/adapter``, the merged model in ``dst``), its adapters' B matrices random (non-zero)."""
    from flywheel.settings import PPOConfig
    from trainer_worker.ppo.causal_lm import add_lora, load_causal_lm, save_policy

    torch.manual_seed(seed)
    policy = add_lora(load_causal_lm(base, "cpu"), PPOConfig(use_lora=True), "CAUSAL_LM")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    save_policy(policy, base, dst, use_lora=True)
    return dst


async def vllm_bench(model: Path, tmp: Path, args: argparse.Namespace) -> None:
    """The canary on Flywheel's ``VLLMEngine``: a second ``AsyncLLM`` or a second adapter."""
    from flywheel.settings import Settings
    from server.engines.vllm_engine import VLLMEngine

    lora = args.canary == "lora"
    active, canary_dir = policies(model, tmp, args)
    settings = Settings(data_dir=tmp, model=str(model), engine="vllm", database_url="sqlite://",
                        vllm_cache_dir=ROOT / ".flywheel" / "vllm",  # compiled once, kept
                        vllm_enforce_eager=args.vllm_eager,
                        ppo={"use_lora": lora})  # type: ignore[arg-type]
    engine = VLLMEngine(settings, model_path=str(active), policy_version="active")
    started = time.perf_counter()
    await engine.start()
    print(f"engine started in {time.perf_counter() - started:.1f}s, engine args "
          f"{ {k: v for k, v in engine._engine_args.items() if k != 'model'} }", flush=True)
    await bench(engine, canary_dir, args, memory=tree_memory_mib,
                pss=lambda: tree_memory_mib(pss=True))


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
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--canary", choices=["full", "lora"], default="full",
                        help="a full-weight canary (on vLLM a second AsyncLLM) or a LoRA policy")
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM: no torch.compile")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="transformers engine: every completion max_tokens long, so that the "
                        "two versions' answer lengths do not weigh on the ratio")
    args = parser.parse_args()
    model = ensure_model(args.model.resolve())
    if args.engine == "vllm":
        print(f"model {model}, max_tokens {args.max_tokens}, {args.rounds} rounds of "
              f"{args.seconds:.0f}s per arm, vLLM in this process, canary: "
              f"{'a LoRA adapter' if args.canary == 'lora' else 'full weights, a second engine'}"
              f", load average {os.getloadavg()[0]:.1f}", flush=True)
        with tempfile.TemporaryDirectory(prefix="flywheel-canary-") as tmp:
            asyncio.run(vllm_bench(model, Path(tmp), args))
        print(f"load average after {os.getloadavg()[0]:.1f}")
        return
    print(f"model {model}, max_tokens {args.max_tokens}, {args.rounds} rounds of "
          f"{args.seconds:.0f}s per arm, core {'in its own' if args.own_process else 'in this'} "
          "process")
    noise = "every weight" if args.canary_weights == "all" else "the layers"
    print("canary: " + ("a LoRA policy beside the active LoRA policy" if args.canary == "lora"
                        else f"noise on {noise}"))
    with tempfile.TemporaryDirectory(prefix="flywheel-canary-") as tmp:
        asyncio.run(transformers_bench(model, Path(tmp), args))


if __name__ == "__main__":
    main()
