"""Serving throughput, measured side by side in one run on one model.

    python bench/serving.py [--model DIR] [--clients 16] [--max-tokens 64] [--seconds 5]
                            [--engine-only] [--stream-interval-ms 0]
                            [--engine transformers|vllm|both] [--against-vllm] [--vllm-eager]
                            [--http-only] [--baseline DIR] [--rounds N]
                            [--engine-process default|on|off|both] [--process-threads N]

Prints tokens/s of (1) raw ``model.generate`` at batch ``--clients`` (sampled, temperature 1),
(2) the ``TransformersEngine`` in-process with that many requests submitted together, (2c/2d) the
engine in-process under that many / one closed-loop clients (requests join a running batch one by
one, as under HTTP), and, unless ``--engine-only``, (3/4) a live ``flywheel serve`` process under
that many / one streaming HTTP clients; with the ratios and time to first token. Tokens are those
actually produced (up to and including EOS); the ``fixed length`` lines ignore EOS on both sides,
so every row decodes exactly ``--max-tokens`` tokens, which isolates the per-step overhead. On CPU
``generate`` runs with the intra-op threads the engine's decode thread gets.

``--engine vllm`` (or ``both``) measures ``flywheel serve`` with ``FLYWHEEL_ENGINE=vllm`` over
HTTP (rows 1-2d are the transformers engine's and are skipped for vLLM alone), and
``--against-vllm`` also runs vLLM's own OpenAI server (``python -m
vllm.entrypoints.openai.api_server``) on the same model and load, and prints each Flywheel
engine's ratio to it. Both need vLLM importable: run with the interpreter of
``scripts/vllm-venv.sh`` on CPU.
vLLM runs in float32 with a 1 GiB KV cache on CPU (eager with ``--vllm-eager``) on both servers.

All servers start first and are then measured in turn, ``--rounds`` times (every other round
in reverse order), so that the machine's other load falls on each alike; each ratio to vLLM's own
server is also given as the median of the rounds' ratios, with their range. ``--baseline DIR``
adds the same engine(s) served from another checkout (``git worktree add DIR HEAD~1``), for
before and after in one run.
``--engine-process both`` serves the transformers engine twice, in its own process
(``FLYWHEEL_ENGINE_PROCESS=true``) and in the API server's, and ``--process-threads N`` adds the
former with ``OMP_NUM_THREADS=N`` in its engine process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engines.base import SamplingParams
from server.engines.model_loading import decode_threads
from server.engines.transformers_engine import TransformersEngine

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is 7 plus 5?", "What is the capital of France?", "How do you spell apple?",
    "Hello!", "What is 9 minus 4?", "Which city is the capital of Japan?",
    "Spell the word river.", "Hi, how is it going?", "Add 3 and 8.",
    "Tell me the capital of Kenya.", "Can you spell 'music'?", "Good morning!",
    "What's 12 - 7?", "Capital of Norway?", "Spell cloud for me.", "Hey there!",
]


@dataclass
class Run:
    """Tokens produced over wall-clock seconds, with per-request time to first token."""

    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    cpu: float = 0.0  # CPU seconds the server's processes spent (HTTP rows)
    cpu_api: float = 0.0  # ... its API process alone

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def add(self, other: Run) -> None:
        self.tokens += other.tokens
        self.seconds += other.seconds
        self.ttft += other.ttft
        self.cpu += other.cpu
        self.cpu_api += other.cpu_api


def ensure_model(path: Path) -> Path:
    if not (path / "config.json").exists():
        from flywheel.demo_model import build_demo_model

        print(f"building the demo model into {path} ...", flush=True)
        build_demo_model(path, progress=False)
    return path


def conversations(clients: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(clients)]


def generate_round(engine: TransformersEngine, prompts: list[list[int]], max_new: int,
                   fixed_length: bool) -> Run:
    """One ``model.generate`` call on the whole left-padded batch, sampled at temperature 1."""
    model, pad = engine.model, engine.tokenizer.pad_token_id or 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                        device=model.device)
    eos = list(engine.eos_token_ids)
    kwargs = {"min_new_tokens": max_new} if fixed_length else {}
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                             top_p=1.0, top_k=0, max_new_tokens=max_new, eos_token_id=eos,
                             pad_token_id=pad, **kwargs)
    seconds = time.perf_counter() - start
    tokens = 0
    for row in out[:, width:].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        tokens += ends[0] + 1 if ends else len(row)
    return Run(tokens, seconds)


async def engine_round(engine: TransformersEngine, prompts: list[list[int]], max_new: int) -> Run:
    """All prompts submitted at once to the running engine; tokens counted as they stream."""
    params = SamplingParams(max_tokens=max_new, temperature=1.0)
    run = Run()

    async def one(i: int, prompt: list[int]) -> None:
        sent, first = time.perf_counter(), True
        async for delta in engine.generate(prompt, params, f"bench-{i}"):
            if first:
                run.ttft.append(time.perf_counter() - sent)
                first = False
            run.tokens += len(delta.token_ids)

    start = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    run.seconds = time.perf_counter() - start
    return run


async def engine_vs_generate(model: Path, clients: int, max_new: int, seconds: float,
                             fixed_length: bool) -> tuple[Run, Run]:
    """Alternate generate and engine rounds, at least ``seconds`` each, so that background load
    hits both alike."""
    engine = TransformersEngine(str(model), max_batch_size=max(32, clients),
                                ignore_eos=fixed_length)
    await engine.start()
    prompts = [engine.encode_chat(c) for c in conversations(clients)]
    generate_round(engine, prompts, max_new, fixed_length)  # warm-up: allocator, kernels
    await engine_round(engine, prompts, max_new)
    gen, eng = Run(), Run()
    while min(gen.seconds, eng.seconds) < seconds:
        gen.add(generate_round(engine, prompts, max_new, fixed_length))
        eng.add(await engine_round(engine, prompts, max_new))
    await engine.stop()
    return gen, eng


async def engine_clients(model: Path, clients: int, max_new: int, seconds: float) -> Run:
    """``clients`` in-process clients sending requests back to back: the server's traffic shape
    without HTTP, so requests join a running batch one by one."""
    engine = TransformersEngine(str(model), max_batch_size=max(32, clients))
    await engine.start()
    prompts = [engine.encode_chat(c) for c in conversations(len(QUESTIONS))]
    params = SamplingParams(max_tokens=max_new, temperature=1.0)
    await engine_round(engine, prompts[:clients], max_new)  # warm-up
    run = Run()
    start = time.perf_counter()

    async def client(c: int) -> None:
        r = 0
        while time.perf_counter() - start < seconds:
            sent, first = time.perf_counter(), True
            async for delta in engine.generate(prompts[(c + r) % len(prompts)], params, "b"):
                if first:
                    run.ttft.append(time.perf_counter() - sent)
                    first = False
                run.tokens += len(delta.token_ids)
            r += 1

    await asyncio.gather(*(client(c) for c in range(clients)))
    run.seconds = time.perf_counter() - start
    await engine.stop()
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VLLM_KV_CACHE_BYTES = 1 << 30  # what Flywheel gives vLLM on CPU (flywheel/vllm/params.py)


def start_server(model: Path, workdir: Path, stream_interval_ms: float, engine: str,
                 vllm_eager: bool, checkout: Path = ROOT, extra_env: dict[str, str] | None = None,
                 ) -> tuple[subprocess.Popen[bytes], str]:
    """``flywheel serve`` with ``engine`` from ``checkout``, or vLLM's own OpenAI server for
    ``engine`` "vllm-own"."""
    port = free_port()
    if engine == "vllm-own":
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--served-model-name", "flywheel", "--port", str(port), "--dtype", "float32",
                "--kv-cache-memory-bytes", str(VLLM_KV_CACHE_BYTES), "--enable-prefix-caching",
                "--max-logprobs", "20", "--logprobs-mode", "processed_logprobs",
                "--disable-uvicorn-access-log", *(["--enforce-eager"] if vllm_eager else [])]
    else:
        argv = [sys.executable, "-m", "flywheel.cli", "serve"]
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLYWHEEL_MODEL=str(model), FLYWHEEL_PORT=str(port),
               FLYWHEEL_STREAM_INTERVAL_MS=str(stream_interval_ms),
               FLYWHEEL_DATABASE_URL=f"sqlite:///{workdir / 'b.db'}",
               FLYWHEEL_DATA_DIR=str(workdir), FLYWHEEL_LOG_LEVEL="warning",
               FLYWHEEL_ENGINE=engine if engine != "vllm-own" else "vllm",
               FLYWHEEL_VLLM_ENFORCE_EAGER=str(vllm_eager).lower(),
               FLYWHEEL_VLLM_KV_CACHE_BYTES=str(VLLM_KV_CACHE_BYTES),
               VLLM_CACHE_ROOT=str(workdir.parent / "flywheel-bench-vllm-cache"),
               # ``python -m`` puts ``checkout`` first on the path, ahead of the installed code
               PYTHONPATH=str(checkout), **(extra_env or {}))
    env.pop("FLYWHEEL_REDIS_URL", None)
    log = (workdir / f"{engine}.log").open("wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=checkout)
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                ready = await client.get(f"{url}/readyz")
                if ready.status_code == 404:  # vLLM's own server
                    ready = await client.get(f"{url}/health")
                if ready.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError("server not ready")


async def stream_one(client: object, url: str, messages: list[dict[str, str]],
                     max_new: int, logprobs: bool = False) -> tuple[int, float]:
    """One streamed chat completion: (completion tokens from usage, time to first content)."""
    body = {"model": "flywheel", "messages": messages, "max_tokens": max_new, "stream": True,
            "temperature": 1.0, "stream_options": {"include_usage": True},
            **({"logprobs": True} if logprobs else {})}
    sent, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:  # type: ignore[attr-defined]
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - sent
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, first if first is not None else time.perf_counter() - sent


async def http_run(url: str, clients: int, seconds: float, max_new: int,
                   logprobs: bool = False) -> Run:
    """``clients`` concurrent clients, each sending streamed requests back to back for
    ``seconds`` (requests in flight at the deadline finish and count)."""
    import httpx

    convs = conversations(max(clients, len(QUESTIONS)))
    run = Run()
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()

        async def worker(c: int) -> None:
            r = 0
            while time.perf_counter() - start < seconds:
                tokens, ttft = await stream_one(client, url, convs[(c + r) % len(convs)],
                                                max_new, logprobs)
                run.tokens += tokens
                run.ttft.append(ttft)
                r += 1

        await asyncio.gather(*(worker(c) for c in range(clients)))
        run.seconds = time.perf_counter() - start
    return run


@dataclass
class Server:
    """One server under test, with what was measured on it over all rounds."""

    name: str
    engine: str  # transformers, vllm or vllm-own
    checkout: Path = ROOT
    logprobs: bool = False  # requests ask for the sampled tokens' logprobs
    env: dict[str, str] = field(default_factory=dict)  # the server's extra environment
    many: Run = field(default_factory=Run)
    one: Run = field(default_factory=Run)
    many_rates: list[float] = field(default_factory=list)  # tokens/s at many clients, per round


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a server with its child processes (vLLM's engine core),
    and of its API process alone: on a shared machine, what each server spends per token is the
    comparison that holds however much CPU the others leave it. vLLM's engine core also spends
    CPU spinning while it waits, which the API process's figure leaves out."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    total = api = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
        api = api if proc is not root else times.user + times.system
    return total, api


def cpu_per_token(run: Run) -> str:
    tokens = max(1, run.tokens)
    return (f"{1e5 * run.cpu / tokens:5.1f} CPU ms/100 tokens "
            f"({1e5 * run.cpu_api / tokens:5.1f} in the API process)")


async def http_rounds(model: Path, servers: list[Server], clients: int, max_new: int,
                      seconds: float, stream_interval_ms: float, vllm_eager: bool,
                      rounds: int) -> None:
    """Start every server, then measure them in turn, ``rounds`` times: each server sees the
    same background load as the others, however the machine's other work comes and goes."""
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-") as tmp:
        procs: list[tuple[subprocess.Popen[bytes], str]] = []
        try:
            for i, server in enumerate(servers):
                procs.append(start_server(model, Path(tmp) / str(i), stream_interval_ms,
                                          server.engine, vllm_eager, server.checkout, server.env))
                await wait_ready(procs[-1][1], procs[-1][0])  # one start at a time: less noise
            for _, url in procs:
                await http_run(url, clients, 1.0, max_new)  # warm-up
            for r in range(rounds):
                # Every other round in reverse order: no server always follows the same one.
                order = list(zip(servers, procs, strict=True))[::1 if r % 2 == 0 else -1]
                for n, attr in ((clients, "many"), (1, "one")):
                    for server, (proc, url) in order:
                        before = cpu_seconds(proc.pid)
                        run = await http_run(url, n, seconds, max_new, server.logprobs)
                        after = cpu_seconds(proc.pid)
                        run.cpu, run.cpu_api = after[0] - before[0], after[1] - before[1]
                        getattr(server, attr).add(run)
                        if attr == "many":
                            server.many_rates.append(run.rate)
                        print(f"  round {r + 1}, {n:2d} client(s): {run.rate:7.1f} tok/s, "
                              f"{cpu_per_token(run)}  {server.name}", flush=True)
        finally:
            for proc, _ in procs:
                proc.terminate()
            for proc, _ in procs:
                proc.wait(timeout=60)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(name: str, run: Run) -> None:
    print(f"{name:<52} {run.rate:9.1f} tok/s  ({run.tokens} tokens in {run.seconds:.2f}s)")


def in_process(args: argparse.Namespace, model: Path) -> Run:
    """Rows (1) to (2d): ``model.generate`` and the transformers engine, in this process."""
    b = args.clients
    for fixed in (True, False):
        label = "fixed length" if fixed else "until EOS"
        gen, eng = asyncio.run(engine_vs_generate(model, b, args.max_tokens, args.seconds, fixed))
        report(f"(1) model.generate, batch {b}, {label}", gen)
        report(f"(2) engine in-process, {b} concurrent, {label}", eng)
        print(f"    (2)/(1) = {eng.rate / gen.rate:.2f}x  (target >= 0.95x)")
    many = asyncio.run(engine_clients(model, b, args.max_tokens, args.seconds))
    one = asyncio.run(engine_clients(model, 1, args.max_tokens, args.seconds))
    report(f"(2c) engine in-process, {b} closed-loop clients", many)
    report("(2d) engine in-process, 1 closed-loop client", one)
    print(f"    (2c)/(1) = {many.rate / gen.rate:.2f}x, (2c)/(2d) = {many.rate / one.rate:.2f}x, "
          f"TTFT p50 {1000 * statistics.median(many.ttft):.1f} ms, "
          f"p99 {1000 * percentile(many.ttft, 0.99):.1f} ms")
    return gen


def ttft(run: Run) -> str:
    return (f"TTFT p50 {1000 * statistics.median(run.ttft):.1f} ms, "
            f"p99 {1000 * percentile(run.ttft, 0.99):.1f} ms")


def variants(name: str, engine: str, args: argparse.Namespace) -> list[Server]:
    """The servers of one engine: the transformers engine in and out of its own process."""
    if engine != "transformers" or args.engine_process == "default":
        return [Server(name, engine)]
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.engine_process]
    servers = [Server(f"{name}, {'own process' if on else 'in-process'}", engine,
                      env={"FLYWHEEL_ENGINE_PROCESS": str(on).lower()}) for on in modes]
    if args.process_threads:
        servers.append(Server(f"{name}, own process, {args.process_threads} threads", engine,
                              env={"FLYWHEEL_ENGINE_PROCESS": "true",
                                   "OMP_NUM_THREADS": str(args.process_threads)}))
    return servers


def over_http(args: argparse.Namespace, model: Path, gen: Run | None) -> None:
    """Rows (3) and (4) per server, all started at once and measured in turn."""
    b = args.clients
    names = {"transformers": "flywheel serve, transformers", "vllm": "flywheel serve, vLLM",
             "vllm-own": "vLLM's own OpenAI server"}
    engines = ["transformers", "vllm"] if args.engine == "both" else [args.engine]
    servers = [s for e in engines for s in variants(names[e], e, args)]
    if args.baseline is not None:
        servers += [Server(f"{names[e]} @ {args.baseline.name}", e, args.baseline.resolve())
                    for e in engines]
    if args.against_vllm:
        servers.append(Server(names["vllm-own"], "vllm-own"))
    if args.vllm_logprobs:  # what Flywheel asks of vLLM on every request, for PPO
        servers.append(Server(f"{names['vllm-own']}, logprobs", "vllm-own", logprobs=True))
    asyncio.run(http_rounds(model, servers, b, args.max_tokens, args.seconds,
                            args.stream_interval_ms, args.vllm_eager, args.rounds))
    for server in servers:
        report(f"(3) {server.name}, {b} streaming clients", server.many)
        report(f"(4) {server.name}, 1 streaming client", server.one)
        print(f"    CPU: {cpu_per_token(server.many)} at {b} clients, "
              f"{cpu_per_token(server.one)} at 1")
        if gen is not None and server.engine == "transformers":
            print(f"    (3)/(1) = {server.many.rate / gen.rate:.2f}x  (target >= 0.9x)")
        print(f"    (3)/(4) = {server.many.rate / server.one.rate:.2f}x  (target >= 5x); "
              f"at {b} clients {ttft(server.many)}; at 1 client {ttft(server.one)}")
    own = next((s for s in servers if s.engine == "vllm-own" and not s.logprobs), None)
    if own is not None:
        targets = {"vllm": 0.95, "transformers": 0.9}
        for server in servers:
            if server.engine in targets or server.logprobs:
                cpu = (server.many.cpu / server.many.tokens) / (own.many.cpu / own.many.tokens)
                api = ((server.many.cpu_api / server.many.tokens)
                       / (own.many.cpu_api / own.many.tokens))
                rounds = sorted(a / o for a, o in zip(server.many_rates, own.many_rates,
                                                      strict=True))
                print(f"    {server.name} / vLLM's own server at {b} clients = "
                      f"{server.many.rate / own.many.rate:.2f}x  "
                      f"(target >= {targets.get(server.engine, '-')}x; median of rounds "
                      f"{statistics.median(rounds):.2f}x, {rounds[0]:.2f}x to {rounds[-1]:.2f}x); "
                      f"CPU per token {cpu:.2f}x, in the API process {api:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".flywheel/models/base"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum time per measurement")
    parser.add_argument("--engine-only", action="store_true")
    parser.add_argument("--http-only", action="store_true", help="skip rows (1) to (2d)")
    parser.add_argument("--stream-interval-ms", type=float, default=0.0,
                        help="the server's FLYWHEEL_STREAM_INTERVAL_MS")
    parser.add_argument("--engine", choices=["transformers", "vllm", "both"],
                        default="transformers", help="the engine(s) of `flywheel serve`")
    parser.add_argument("--against-vllm", action="store_true",
                        help="also run vLLM's own OpenAI server on the same model and load")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="also serve the same engine(s) from this checkout (e.g. a `git "
                             "worktree` of the last commit): before and after in one run")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every server this many times, in turn")
    parser.add_argument("--vllm-logprobs", action="store_true",
                        help="also measure vLLM's own server with requests asking for logprobs "
                             "(as Flywheel asks vLLM on every request)")
    parser.add_argument("--engine-process", choices=["default", "on", "off", "both"],
                        default="default",
                        help="the transformers engine in its own process, in the API server's "
                             "or both side by side (default: as FLYWHEEL_ENGINE_PROCESS says)")
    parser.add_argument("--process-threads", type=int, default=0,
                        help="also the engine process with this many OMP threads")
    parser.add_argument("--vllm-eager", action="store_true",
                        help="vLLM without torch.compile (starts faster, decodes slower)")
    args = parser.parse_args()
    model = ensure_model(args.model.resolve())
    threads = decode_threads(torch.device("cpu"), None) if not torch.cuda.is_available() else None
    if threads is not None:
        threads.start()  # generate gets the threads the in-process decode thread gets
    print(f"model {model}, max_tokens {args.max_tokens}, {torch.get_num_threads()} torch threads")
    gen = in_process(args, model) if args.engine != "vllm" and not args.http_only else None
    if not args.engine_only:
        over_http(args, model, gen)


if __name__ == "__main__":
    main()
