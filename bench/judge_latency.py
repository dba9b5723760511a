"""Time from "evidence sufficient" to "decision in SQL", with and without a training cycle running.

    python bench/judge_latency.py [--trials 5] [--cycle-seconds 30] [--databases sqlite,postgres]

A real `Worker` runs in a thread (no Redis: the local lock; the default `canary.judge_seconds`
and `train.poll_seconds`) on a fresh database of each kind. Each trial puts a version on canary
and stores anonymous thumbs in batches (the canary 30% approval, the active 70%, one canary thumb
to four active ones, as a 0.2 canary split gets them), until `decide_canary`, on what the store
now holds, pooled as the worker pools it, returns a verdict. The clock starts when the batch that
made it so is stored and stops when a poll of SQL (every 5 ms) sees the canary rejected.

Mode "idle": no cycle runs. Mode "cycle": a manual run was queued first and the worker is inside
`run_cycle`, patched here to a deliberately slow cycle that multiplies matrices with torch on one
thread (as PPO on a CPU does) for `--cycle-seconds` and skips. Before the judge thread, the
worker judged only between cycles, so a decision then waited for the rest of the cycle: run this
file from a checkout of an older commit to see it (the timeout per trial is the cycle's length
plus a margin).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._databases import create_database, drop_database
from feedback_store import Store
from flywheel.settings import CanarySettings, Settings, TrainSettings
from tests.conftest import POSTGRES_URL
from tests.trainer_worker.test_promotion import rate
from trainer_worker import worker as worker_module
from trainer_worker.cycle import CycleResult
from trainer_worker.worker import Worker

BATCH = 10  # canary thumbs per batch (and 4x as many on the active version)


def slow_cycle_factory(seconds: float, started: threading.Event, finish: threading.Event):
    def slow_cycle(ctx, run_id: int) -> CycleResult:
        import torch

        torch.set_num_threads(1)
        a, b = torch.randn(256, 256), torch.randn(256, 256)
        started.set()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not finish.is_set():
            if ctx.should_stop():
                raise InterruptedError("stopped")
            for _ in range(20):
                a = torch.tanh(a @ b)
        return CycleResult("skipped", {"cycle/skip_reason": "bench"}, None, None)

    return slow_cycle


def verdict(worker: Worker, active: str, canary: str) -> str:
    decision, _ = worker.promotion.canary_decision(active, worker.store.get_policy(canary))
    return decision.verdict


def trial(worker: Worker, store: Store, version: str, mode: str, cycle_seconds: float,
          started: threading.Event, finish: threading.Event) -> tuple[float, int]:
    """(seconds from sufficient evidence to the rejection in SQL, canary thumbs stored)."""
    store.start_canary(version, 0.2)
    if mode == "cycle":
        started.clear()
        finish.clear()
        store.create_training_run(trigger="manual")
        if not started.wait(60):
            raise RuntimeError("the cycle never started")
    thumbs = 0
    while True:
        rate(store, "policy-0", 28, 12)  # 70% of 4 x BATCH
        rate(store, version, 3, 7)  # 30% of BATCH
        stored = time.monotonic()
        thumbs += BATCH
        if verdict(worker, "policy-0", version) != "wait":
            break
        if store.get_policy(version)["status"] != "canary":
            raise RuntimeError(f"{version} was decided before its evidence sufficed")
    limit = stored + cycle_seconds + 30
    while store.get_policy(version)["status"] == "canary":
        if time.monotonic() > limit:
            raise RuntimeError(f"{version} was not decided within {limit - stored:.0f} s")
        time.sleep(0.005)
    took = time.monotonic() - stored
    if mode == "cycle":
        running = store.list_training_runs(limit=1)[0]["status"] == "running"
        finish.set()
        while any(r["status"] in ("queued", "running") for r in store.list_training_runs(limit=3)):
            time.sleep(0.05)
        if not running:
            print(f"    (the cycle had ended when the decision was seen, {took:.2f} s after "
                  "the deciding thumbs)")
    return took, thumbs


def run(kind: str, trials: int, cycle_seconds: float) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        url = (f"sqlite:///{tmp}/bench.db" if kind == "sqlite"
               else create_database(POSTGRES_URL, "flywheel_bench_judge"))
        try:
            store = Store(url)
            store.upgrade()
            store.ensure_base_policy("/models/base", None)
            for n in range(1, 2 * trials + 1):
                store.add_policy(id=f"policy-{n}", parent="policy-0", path=f"/ckpt/policy-{n}",
                                 sha256="ab" * 32)
            settings = Settings(data_dir=Path(tmp), database_url=url, model="/models/base",
                                redis_url="", canary=CanarySettings(auto=True),
                                train=TrainSettings(min_new_feedback=10**9, device="cpu"))
            started, finish = threading.Event(), threading.Event()
            worker_module.run_cycle = slow_cycle_factory(cycle_seconds, started, finish)
            worker = Worker(settings, store=store)
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            results: dict[str, list[float]] = {"idle": [], "cycle": []}
            number = 0
            try:
                for _ in range(trials):
                    for mode in ("idle", "cycle"):
                        number += 1
                        took, thumbs = trial(worker, store, f"policy-{number}", mode,
                                             cycle_seconds, started, finish)
                        results[mode].append(took)
                        print(f"  {kind:8s} {mode:5s} policy-{number}: decided {took:6.3f} s "
                              f"after the deciding thumbs ({thumbs} canary thumbs)", flush=True)
            finally:
                finish.set()
                worker.stopping.set()
                thread.join(60)
            return results
        finally:
            if kind == "postgres":
                drop_database(POSTGRES_URL, url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--cycle-seconds", type=float, default=30.0)
    parser.add_argument("--databases", default="sqlite,postgres")
    args = parser.parse_args()
    summary = []
    for kind in args.databases.split(","):
        results = run(kind, args.trials, args.cycle_seconds)
        for mode, values in results.items():
            summary.append(f"{kind:8s} {mode:5s} n={len(values)}  median "
                           f"{statistics.median(values):6.3f} s  max {max(values):6.3f} s")
    print(f"\nevidence sufficient -> decision in SQL (cycle of {args.cycle_seconds:.0f} s "
          "when one runs):")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
