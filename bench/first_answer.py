"""Seconds from `flywheel up` to its first chat answer, from an empty cache, then from a warm one.

    python bench/first_answer.py [--beside] [--spins 1000 300000]

Each measurement starts `flywheel up` on a free port with an empty data directory, polls
`POST /v1/chat/completions` until an answer comes and stops it. "first": an empty
`FLYWHEEL_CACHE_DIR` too, so the demo model is built (the first start on a machine after the
pip install); "second": the cache that build left, a new data directory (a second clone);
"restart": the same data directory again. `--spins`: the `GOMP_SPINCOUNT` each round runs with
(300000 is libgomp's own default; `flywheel` sets 1000 unless told otherwise), in turn, for
ratios within one run. `--beside`: while measuring, another job runs a two-thread torch matrix
product loop (a worst case: it spins too).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BESIDE = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(700, 700)\n"
          "while True:\n    a @ a\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def time_to_answer(cache: Path, data: Path, env: dict[str, str]) -> float:
    """Seconds from starting `flywheel up` to its first answer."""
    port = _free_port()
    started = time.monotonic()
    log = (data.parent / f"{data.name}.log").open("ab")
    up = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "up", "--port", str(port),
                           "--data-dir", str(data)], cwd=ROOT, stdout=log,
                          stderr=subprocess.STDOUT, env={**env, "FLYWHEEL_CACHE_DIR": str(cache)})
    body = {"model": "flywheel", "max_tokens": 8,
            "messages": [{"role": "user", "content": "What is 2 plus 3?"}]}
    try:
        while True:
            if up.poll() is not None:
                raise RuntimeError(f"flywheel up exited {up.returncode}: see {log.name}")
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                                    timeout=30)
                if answer.status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    finally:
        up.send_signal(2)
        up.wait(60)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spins", nargs="+", default=["1000"],
                        help="GOMP_SPINCOUNT per round (300000: libgomp's default)")
    parser.add_argument("--beside", action="store_true",
                        help="a two-thread torch loop runs beside every measurement")
    args = parser.parse_args()
    other = subprocess.Popen([sys.executable, "-c", BESIDE]) if args.beside else None
    print(f"{'GOMP_SPINCOUNT':>14} {'first (s)':>10} {'second (s)':>11} {'restart (s)':>12}"
          + ("  (beside a two-thread torch loop)" if other else ""), flush=True)
    try:
        for spins in args.spins:
            with tempfile.TemporaryDirectory(prefix="flywheel-first-answer-") as tmp:
                env = {**os.environ, "GOMP_SPINCOUNT": spins}
                cache = Path(tmp) / "cache"
                first = time_to_answer(cache, Path(tmp) / "a", env)
                second = time_to_answer(cache, Path(tmp) / "b", env)
                restart = time_to_answer(cache, Path(tmp) / "b", env)
            print(f"{spins:>14} {first:>10.1f} {second:>11.1f} {restart:>12.1f}", flush=True)
    finally:
        if other is not None:
            other.kill()


if __name__ == "__main__":
    main()
