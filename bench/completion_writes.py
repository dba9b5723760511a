"""CPU the serving path spends storing each completion, on SQLite and PostgreSQL.

    python bench/completion_writes.py [--completions 2000] [--postgres URL] [--baseline DIR]
                                      [--rounds 3]

Stores ``--completions`` served completions (one choice of 12 tokens, as the demo model answers)
through ``Store.record_completions``, as the API server's group commit calls it: alone (batch 1,
a quiet server) and 16 at a time (a busy one), with prompts that repeat (16 questions, as in
``bench/serving.py``) or never do (multi-turn chat). Prints the process CPU per completion: the
API server runs these writes on a thread that shares the event loop's GIL, so this CPU is taken
from the serving of tokens. ``--baseline DIR`` measures another checkout (``git worktree add DIR
HEAD~1``) in the same run, round by round, and prints the ratio (after / before; lower is
better). Each measurement runs in a fresh process on a fresh database.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Appended: in `measure`'s process the checkout being measured (PYTHONPATH) must come first.
sys.path.append(str(ROOT))

from bench._databases import create_database, drop_database  # noqa: E402

QUESTIONS = [f"What is {i} plus {i + 1}?" for i in range(16)]
CASES = [(batch, prompts) for prompts in ("repeated", "unique") for batch in (1, 16)]


def measure(url: str, batch: int, prompts: str, completions: int) -> float:
    """CPU microseconds per completion stored (run inside the checkout being measured)."""
    from feedback_store import NewChoice, NewCompletion, Store

    def completion() -> NewCompletion:
        question = random.choice(QUESTIONS) if prompts == "repeated" else uuid.uuid4().hex
        tokens = [random.randrange(200) for _ in range(12)]
        return NewCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", kind="chat", prompt_text=f"<|user|>{question}",
            prompt_token_ids=list(range(20)), messages=[{"role": "user", "content": question}],
            model="flywheel", policy_version="policy-0",
            params={"temperature": 1.0, "max_tokens": 64},
            choices=[NewChoice(0, "twelve " * 6, tokens, [-0.5] * 12, "stop")])

    store = Store(url)
    store.upgrade()
    warm = [completion() for _ in range(64)]
    for i in range(0, len(warm), batch):
        store.record_completions(warm[i:i + batch])
    records = [completion() for _ in range(completions)]
    start = time.process_time()
    for i in range(0, completions, batch):
        assert store.record_completions(records[i:i + batch]) == [None] * len(records[i:i + batch])
    cpu = time.process_time() - start
    store.close()
    return cpu / completions * 1e6


def run_in(checkout: Path, url: str, batch: int, prompts: str, completions: int) -> float:
    """`measure` in a fresh process that imports the store from ``checkout``."""
    out = subprocess.run(
        [sys.executable, __file__, "--measure", url, str(batch), prompts, str(completions)],
        check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(checkout)})
    return float(out.stdout)


def fresh_database(backend: str, postgres: str, folder: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{folder / f'{uuid.uuid4().hex}.db'}"
    return create_database(postgres, "flywheel_bench")


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        url, batch, prompts, completions = sys.argv[2:]
        print(measure(url, int(batch), prompts, int(completions)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--completions", type=int, default=2000)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                        help="an existing database; a fresh one is made beside it (or 'none')")
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    backends = ["sqlite"] + ([] if args.postgres == "none" else ["postgresql"])
    checkouts = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    results: dict[tuple[str, str, int, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for backend in backends:
                for batch, prompts in CASES:
                    for name, checkout in checkouts.items():
                        url = fresh_database(backend, args.postgres, Path(folder))
                        try:
                            us = run_in(checkout, url, batch, prompts, args.completions)
                        finally:
                            if backend == "postgresql":
                                drop_database(args.postgres, url)
                        results.setdefault((backend, prompts, batch, name), []).append(us)
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"CPU per completion stored, median of {args.rounds} rounds of {args.completions}")
    header = f"{'database':<11}{'prompts':<10}{'batch':>6}{'this (us)':>11}"
    print(header + (f"{'baseline (us)':>15}{'ratio':>8}" if args.baseline else ""))
    rows = []
    for backend in backends:
        for batch, prompts in CASES:
            this = statistics.median(results[(backend, prompts, batch, "this")])
            line = f"{backend:<11}{prompts:<10}{batch:>6}{this:>11.0f}"
            row = {"database": backend, "prompts": prompts, "batch": batch, "this_us": this}
            if args.baseline:
                before = statistics.median(results[(backend, prompts, batch, "baseline")])
                line += f"{before:>15.0f}{this / before:>7.2f}x"
                row |= {"baseline_us": before, "ratio": this / before}
            print(line)
            rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
