"""Does a training cycle grow with history? The same cycle on 10 thousand and on 1 million
feedback rows in PostgreSQL; prints the ratios of cycle time and of the worker's peak RSS.

    python bench/cycle_scale.py [--small 10000] [--large 1000000] [--postgres URL]

Each database gets prompts, completions, two answers per completion, a thumb on every answer
(up on the first, down on the second) and a ranking on every tenth completion, written with
COPY; then a reward model in service whose watermark leaves the newest `--new` events as new.
A fresh worker process per database then runs the data and reward-model part of a cycle
(trainer_worker/cycle.py steps 0 and 1: the held-out sample and evidence check, the bounded
window, agreement scoring with the RM in service, per-identity caps, RM training and held-out
accuracy) and samples the prompts PPO and the gate would use. PPO and the gate read nothing
else from the database, so their time does not depend on history and is left out.
Targets: time ratio <= 1.3, peak RSS ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._databases import create_database, drop_database  # noqa: E402
from feedback_store import Store  # noqa: E402
from feedback_store.training_data import is_holdout_hash  # noqa: E402

USERS = 200  # raters in the generated data
ANSWER_TOKENS = 30
PROMPT_TOKENS = 20
RANK_EVERY = 10  # a ranking on every tenth completion


def _ids(rng: random.Random, n: int, vocab: int) -> str:
    return json.dumps([rng.randrange(4, vocab) for _ in range(n)])


def _copy(cursor: object, table: str, columns: str, rows: object) -> None:
    with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:  # type: ignore[attr-defined]
        for row in rows:  # type: ignore[attr-defined]
            copy.write_row(row)


def generate(url: str, feedback_rows: int, vocab: int, seed: int = 0) -> dict[str, int]:
    """Write the rows with COPY; returns how many of each."""
    import psycopg

    rng = random.Random(seed)
    completions = feedback_rows // 2
    prompts = max(200, completions // 5)
    now = "2026-12-01 00:00:00+00"
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        def prompt_rows() -> object:
            for i in range(1, prompts + 1):
                text = f"bench prompt {i}"
                sha = hashlib.sha256(text.encode()).hexdigest()
                yield (i, sha, text, _ids(rng, PROMPT_TOKENS, vocab), is_holdout_hash(sha), now)

        _copy(cur, "prompts", "id, sha256, prompt_text, prompt_token_ids, holdout, created_at",
              prompt_rows())
        _copy(cur, "completions", "id, prompt_id, kind, model, policy_version, params, \"user\", "
              "created_at", ((f"cmpl-{i}", rng.randrange(1, prompts + 1), "text", "flywheel",
                              "policy-0", "{}", f"user-{i % USERS}", now)
                             for i in range(completions)))
        _copy(cur, "choices", "id, completion_id, \"index\", text, token_ids, logprobs, "
              "finish_reason", ((2 * i + j + 1, f"cmpl-{i}", j, f"answer {i} {j}",
                                 _ids(rng, ANSWER_TOKENS, vocab), "[]", "stop")
                                for i in range(completions) for j in range(2)))
        _copy(cur, "feedback", "id, public_id, choice_id, rating, \"user\", request_hash, "
              "created_at", ((2 * i + j + 1, f"fb-{2 * i + j + 1}", 2 * i + j + 1,
                              "up" if j == 0 else "down", f"user-{i % USERS}", "0" * 64, now)
                             for i in range(completions) for j in range(2)))
        ranked = range(0, completions, RANK_EVERY)
        cur.execute("SELECT id, prompt_id FROM completions WHERE id = ANY(%s)",
                    ([f"cmpl-{i}" for i in ranked],))
        prompt_of = dict(cur.fetchall())
        _copy(cur, "rankings", "id, public_id, prompt_id, \"user\", request_hash, created_at",
              ((n + 1, f"rk-{n + 1}", prompt_of[f"cmpl-{i}"], f"user-{i % USERS}", "0" * 64, now)
               for n, i in enumerate(ranked)))
        _copy(cur, "ranking_items", "ranking_id, position, tier, choice_id",
              ((n + 1, j, j, 2 * i + j + 1) for n, i in enumerate(ranked) for j in range(2)))
        for table in ("prompts", "choices", "feedback", "rankings"):
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT max(id) FROM {table}))")
        conn.commit()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE")
    return {"prompts": prompts, "completions": completions, "feedback": 2 * completions,
            "rankings": len(ranked)}


def install_reward_model(url: str, model: Path, checkpoints: Path, new_events: int) -> None:
    """An RM in service whose watermark leaves the newest `new_events` thumbs (and a tenth as
    many rankings) new, as after a cycle a while ago."""
    from flywheel.checkpoints import seal
    from trainer_worker.cycle import SPLIT_MARK
    from trainer_worker.reward import RewardModel

    store = Store(url)
    marks = store.feedback_watermark()
    out = checkpoints / "reward" / "rm-1"
    RewardModel.from_base(model).save_pretrained(out)
    manifest = seal(out, "rm-1", parent=None)
    watermark = {"feedback": marks["feedback"] - new_events,
                 "rankings": marks["rankings"] - new_events // (2 * RANK_EVERY)}
    store.add_reward_model(id="rm-1", parent=None, path=str(out), sha256=manifest.sha256,
                           metrics={SPLIT_MARK: 1.0}, watermark=watermark,
                           trained_on_train_split=True)
    store.close()


def child(url: str, model: str, data_dir: str) -> None:
    """One worker process: the cycle's data and RM part; prints JSON with times and peak RSS."""
    import torch

    from flywheel.serving_plan import record_base_policy
    from flywheel.settings import RewardConfig, Settings, TrainSettings
    from trainer_worker.cycle import CycleContext, check_evidence, train_reward
    from trainer_worker.reward import consensus, data, train  # noqa: F401  (imported before timing)

    torch.set_num_threads(1)
    settings = Settings(data_dir=Path(data_dir), database_url=url, model=model,
                        train=TrainSettings(device="cpu", reward_accuracy_floor=0.0),
                        reward=RewardConfig(epochs=1, batch_size=16, max_length=128))
    store = Store(url)
    record_base_policy(settings, store)
    ctx = CycleContext(settings, store, "cpu", should_stop=lambda: False, progress=False)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    until = store.feedback_watermark()
    holdout = check_evidence(ctx, until)
    t_evidence = time.perf_counter()
    _, _, metrics = train_reward(ctx, holdout, until, seed=1)
    t_reward = time.perf_counter()
    store.sample_prompts(settings.ppo.rollout_batch_size * settings.ppo.steps, seed=1)
    store.sample_prompts(settings.train.eval_prompts, seed=10_001, holdout=True)
    finished = time.perf_counter()
    print(json.dumps({
        "seconds": finished - started, "evidence_s": t_evidence - started,
        "reward_s": t_reward - t_evidence, "prompts_s": finished - t_reward,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mib": rss_start / 1024,
        "new": metrics["reward/new_examples"], "replay": metrics["reward/replay_examples"],
        "holdout_pairs": metrics["reward/holdout_pairs"],
        "identities": metrics["reward/identities"]}))
    store.close()


def measure(admin_url: str, rows: int, model: Path, new_events: int) -> dict[str, float]:
    from transformers import AutoTokenizer

    url = create_database(admin_url, "flywheel_scale")
    try:
        store = Store(url)
        store.upgrade()
        store.close()
        t0 = time.perf_counter()
        counts = generate(url, rows, len(AutoTokenizer.from_pretrained(model)))
        print(f"{rows:>9,} feedback rows: generated {counts} in {time.perf_counter() - t0:.0f} s",
              flush=True)
        with tempfile.TemporaryDirectory(prefix="cycle-scale-") as tmp:
            install_reward_model(url, model, Path(tmp) / "checkpoints", new_events)
            env = dict(os.environ, OMP_NUM_THREADS="1")
            out = subprocess.run([sys.executable, __file__, "--child", url, str(model), tmp],
                                 env=env, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{rows:>9,} feedback rows: {result}", flush=True)
        return result
    finally:
        drop_database(admin_url, url)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=2_000, help="new thumbs since the RM")
    parser.add_argument("--model", default=".flywheel/models/base")
    parser.add_argument("--postgres", default=os.environ.get(
        "FLYWHEEL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args()
    model = Path(args.model).resolve()
    if not (model / "config.json").exists():
        from flywheel.demo_model import build_demo_model

        build_demo_model(model)
    small = measure(args.postgres, args.small, model, args.new)
    large = measure(args.postgres, args.large, model, args.new)
    print(f"\ncycle (data + reward model): {small['seconds']:.1f} s -> {large['seconds']:.1f} s, "
          f"ratio {large['seconds'] / small['seconds']:.2f} (target <= 1.3)")
    data_small = small["evidence_s"] + small["prompts_s"]
    data_large = large["evidence_s"] + large["prompts_s"]
    print(f"  of which held-out sample and prompt sampling: {data_small:.2f} s -> "
          f"{data_large:.2f} s")
    print(f"worker peak RSS: {small['peak_rss_mib']:.0f} MiB -> {large['peak_rss_mib']:.0f} MiB, "
          f"ratio {large['peak_rss_mib'] / small['peak_rss_mib']:.2f} (target <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
