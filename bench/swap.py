"""Hot-swap cost on one live server: swap latency, and what swaps do to streaming clients.

    python bench/swap.py [--model DIR] [--clients 16] [--swaps 10] [--max-tokens 32]

Starts ``flywheel serve`` on the demo model (built on first use) with SQLite and Redis (embedded
unless ``FLYWHEEL_REDIS_URL`` is set), prepares sealed checkpoints with perturbed weights and
records them in SQL, then measures, in one run:

1. swap latency: PUBLISH to the first response labelled with the new version, seen by a client
   polling with one-token completions; the median over ``--latency-swaps`` swaps;
2. ``--clients`` streaming clients running back to back through a steady phase (no swaps) and a
   swap phase (``--swaps`` consecutive swaps): failed requests in the swap phase (non-200, broken
   stream, no ``[DONE]``, or one stream labelled with two versions) and the ratio of p99 request
   latency in the swap phase to that of the steady phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feedback_store import Store
from flywheel.checkpoints import digest_of
from flywheel.embedded_redis import EmbeddedRedis
from flywheel.serving_plan import PolicyMessage, Publisher, RedisKeys, ServingPlan
from tests.helpers import make_checkpoint

QUESTIONS = [
    "What is 7 plus 5?", "What is the capital of France?", "How do you spell apple?",
    "Hello!", "What is 9 minus 4?", "Which city is the capital of Japan?",
    "Spell the word river.", "Hi, how is it going?", "Add 3 and 8.",
    "Tell me the capital of Kenya.", "Can you spell 'music'?", "Good morning!",
]
POLL = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


@dataclass
class Sample:
    """One streamed request: when it started, how long it took, and what went wrong if anything."""

    start: float
    seconds: float
    error: str | None


def ensure_model(path: Path) -> Path:
    if not (path / "config.json").exists():
        from flywheel.demo_model import build_demo_model

        print(f"building the demo model into {path} ...", flush=True)
        build_demo_model(path, progress=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


class Bench:
    def __init__(self, url: str, store: Store, redis_client: redis.Redis, keys: RedisKeys,
                 checkpoints: list[PolicyMessage]) -> None:
        self.url, self.store = url, store
        self.publisher = Publisher(redis_client, keys)
        self.pending = list(checkpoints)
        self.http = httpx.AsyncClient(base_url=url, timeout=120,
                                      limits=httpx.Limits(max_connections=64))

    async def served(self) -> str:
        response = await self.http.get("/v1/models")
        return str(response.json()["data"][0]["policy_version"])

    async def swap(self) -> tuple[str, float]:
        """Activate the next checkpoint in SQL, then PUBLISH it (as the worker does)."""
        message = self.pending.pop(0)
        await asyncio.to_thread(self.store.activate_policy, message.version)
        published = time.perf_counter()
        await asyncio.to_thread(self.publisher.announce, ServingPlan(message))
        return message.version, published

    async def swap_latency(self) -> float:
        """Seconds from PUBLISH to the first one-token completion labelled with the new version."""
        version, published = await self.swap()
        while True:
            response = await self.http.post("/v1/chat/completions", json=POLL)
            if response.headers.get("x-flywheel-policy") == version:
                return time.perf_counter() - published

    async def stream_once(self, question: str, max_tokens: int) -> str | None:
        """One streamed chat completion; None when it was served whole, else what went wrong."""
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                "stream": True, "temperature": 1.0}
        versions: set[str] = set()
        done = False
        try:
            async with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return f"HTTP {response.status_code}"
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return "error event"
                    versions.add(chunk.get("system_fingerprint"))
        except (httpx.HTTPError, ValueError) as exc:
            return f"broken stream ({type(exc).__name__})"
        if not done:
            return "no [DONE]"
        if len(versions) != 1:
            return f"labelled {sorted(map(str, versions))}"
        return None

    async def client(self, index: int, max_tokens: int, stop: asyncio.Event,
                     samples: list[Sample]) -> None:
        turn = index
        while not stop.is_set():
            start = time.perf_counter()
            error = await self.stream_once(QUESTIONS[turn % len(QUESTIONS)], max_tokens)
            samples.append(Sample(start, time.perf_counter() - start, error))
            turn += 1

    async def phases(self, clients: int, max_tokens: int, swaps: int, gap: float,
                     warmup: float) -> tuple[list[Sample], list[Sample], list[float]]:
        """Steady phase, then ``swaps`` swaps; samples are assigned by start time."""
        stop, samples = asyncio.Event(), []
        tasks = [asyncio.create_task(self.client(i, max_tokens, stop, samples))
                 for i in range(clients)]
        await asyncio.sleep(warmup)
        swap_start = time.perf_counter()
        swap_seconds = []
        for _ in range(swaps):
            version, published = await self.swap()
            while await self.served() != version:
                await asyncio.sleep(0.01)
            swap_seconds.append(time.perf_counter() - published)
            await asyncio.sleep(gap)
        swap_end = time.perf_counter()
        # The steady phase lasts as long as the swap phase, right after it, with no swaps.
        await asyncio.sleep(swap_end - swap_start)
        steady_end = time.perf_counter()
        stop.set()
        await asyncio.gather(*tasks)
        during = [s for s in samples if swap_start <= s.start < swap_end]
        steady = [s for s in samples if swap_end <= s.start < steady_end]
        return during, steady, swap_seconds


async def run(args: argparse.Namespace, model: Path, workdir: Path, redis_url: str) -> None:
    store = Store(f"sqlite:///{workdir / 'swap.db'}")
    store.upgrade()
    store.ensure_base_policy(str(model), digest_of(model))
    count = args.latency_swaps + args.swaps
    started = time.perf_counter()
    checkpoints = [make_checkpoint(model, workdir / "checkpoints" / "policies" / f"policy-{i}",
                                   f"policy-{i}",
                                   parent="policy-0", perturb_seed=i, store=store)
                   for i in range(1, count + 1)]
    print(f"{count} checkpoints sealed and recorded in {time.perf_counter() - started:.1f}s",
          flush=True)
    namespace = f"bench-swap-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = dict(os.environ, FLYWHEEL_MODEL=str(model), FLYWHEEL_PORT=str(port),
               FLYWHEEL_HOST="127.0.0.1", FLYWHEEL_DATA_DIR=str(workdir),
               FLYWHEEL_DATABASE_URL=f"sqlite:///{workdir / 'swap.db'}",
               FLYWHEEL_REDIS_URL=redis_url, FLYWHEEL_REDIS_NAMESPACE=namespace,
               FLYWHEEL_LOG_LEVEL="warning", FLYWHEEL_API_KEYS="", FLYWHEEL_ADMIN_KEY="")
    log = workdir / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "serve"], env=env,
                                stdout=out, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parents[1])
    redis_client = redis.Redis.from_url(redis_url)
    bench = Bench(f"http://127.0.0.1:{port}", store, redis_client, RedisKeys(namespace),
                  checkpoints)
    try:
        await wait_following(bench, proc, log)
        latencies = [await bench.swap_latency() for _ in range(args.latency_swaps)]
        during, steady, swap_seconds = await bench.phases(
            args.clients, args.max_tokens, args.swaps, args.gap, args.warmup)
    finally:
        await bench.http.aclose()
        redis_client.close()
        proc.terminate()
        proc.wait(timeout=60)
        store.close()

    median = statistics.median(latencies)
    failed = [s for s in during if s.error is not None]
    failed_steady = [s for s in steady if s.error is not None]
    p99_during = percentile([s.seconds for s in during], 0.99)
    p99_steady = percentile([s.seconds for s in steady], 0.99)
    ratio = p99_during / p99_steady
    print(f"swap latencies (s): {' '.join(f'{x:.3f}' for x in latencies)}; under load, PUBLISH "
          f"to served: median {statistics.median(swap_seconds):.3f}, max {max(swap_seconds):.3f}")
    print(f"requests: {len(during)} during swaps, {len(steady)} steady "
          f"({len(failed_steady)} failed); p50 {percentile([s.seconds for s in during], 0.5):.3f}"
          f"s vs {percentile([s.seconds for s in steady], 0.5):.3f}s")
    for sample in failed[:5]:
        print(f"  failed: {sample.error}")
    print(f"(1) swap latency, PUBLISH to first response labelled new: median {median:.3f}s over "
          f"{len(latencies)} swaps  (target <= 1.0s) {verdict(median <= 1.0)}")
    print(f"(2) failed requests, {args.clients} streaming clients through {args.swaps} swaps: "
          f"{len(failed)} of {len(during)}  (target 0) {verdict(not failed)}")
    print(f"(3) p99 request latency, swaps vs steady: {p99_during:.3f}s / {p99_steady:.3f}s = "
          f"{ratio:.2f}x  (target <= 1.5x) {verdict(ratio <= 1.5)}")


async def wait_following(bench: Bench, proc: subprocess.Popen[bytes], log: Path,
                         timeout: float = 300.0) -> None:
    """Until /readyz answers and the server follows Redis."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        try:
            response = await bench.http.get("/readyz")
            if response.status_code == 200 and response.json().get("redis"):
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"server not ready; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".flywheel/models/base"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--latency-swaps", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between swaps")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    model = ensure_model(args.model.resolve())
    workdir = Path(tempfile.mkdtemp(prefix="flywheel-swap-"))
    print(f"model {model}, work directory {workdir}", flush=True)
    try:
        url = os.environ.get("FLYWHEEL_REDIS_URL")
        if url:
            asyncio.run(run(args, model, workdir, url))
        else:
            with EmbeddedRedis(workdir / "redis") as embedded:
                asyncio.run(run(args, model, workdir, embedded.url))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
