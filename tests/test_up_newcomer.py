"""A newcomer's first hour, as a test: `flywheel up` on SQLite with its default data gates, three
named users and some anonymous thumbs, rating by a taste of their own, reach a first policy
(no crowd needed: small groups keep what they say, anonymous thumbs are one rater).

A cycle runs after every 50 rated answers (as `train.min_new_feedback` would start one), so
what is counted is rated answers, not the trainer's speed on this machine.

The taste (ours, not the demo's judge): an answer that ends by itself within 16 tokens is good,
one cut off is bad. Each request asks for two answers; a user thumbs both, so a request whose
answers differ gives that user's pair."""

from __future__ import annotations

import itertools
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import up_env
from tests.server.conftest import free_port, wait_ready

pytestmark = pytest.mark.slow

QUESTIONS = [f"Question {i}: say something about the number {i}." for i in range(60)]
USERS = ["ana", "ben", "chloe", None]  # None: the README's anonymous curl examples
# Rated answers at most before the test gives up: the target is 300; runs took 302, and over
# 455 once (a reward model at 68% of 25 held-out pairs, under the floor), so the bound is a
# regression guard (before: 630 rated answers from 8 users, no policy).
MAX_RATED = 800
BATCH = 50  # rated answers between looks at the trainer


def test_three_users_reach_a_first_policy(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    env = up_env(tiny_model_dir, FLYWHEEL_TRAIN__MIN_NEW_FEEDBACK="1000000",
                 FLYWHEEL_TRAIN__EVAL_PROMPTS="8", FLYWHEEL_TRAIN__GATE_SAMPLES="16",
                 FLYWHEEL_TRAIN__MIN_IMPROVEMENT="-1e9", FLYWHEEL_PPO__STEPS="1",
                 FLYWHEEL_PPO__ROLLOUT_BATCH_SIZE="8", FLYWHEEL_PPO__PPO_EPOCHS="1",
                 FLYWHEEL_PPO__NUM_MINIBATCHES="1", FLYWHEEL_PPO__MAX_NEW_TOKENS="16")
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flywheel.cli", "up", "--port", str(port), "--data-dir",
         str(tmp_path / "data")], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(0)
    rated = 0
    try:
        wait_ready(url, proc, timeout=180)
        with httpx.Client(base_url=url, timeout=120) as client:
            turns = zip(itertools.cycle(USERS), itertools.cycle(QUESTIONS), strict=False)
            first = None
            while first is None and rated < MAX_RATED:
                batch = 0
                while batch < BATCH:
                    batch += _ask_and_rate(client, *next(turns), rng)
                rated += batch
                _train(client)  # a cycle per batch: rated answers are counted, not seconds
                first = _first_policy(client)
            runs = client.get("/v1/training/runs").json()["data"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    reasons = [r["reason"] for r in runs if r["status"] == "skipped"]
    assert first is not None, (rated, reasons, (tmp_path / "up.log").read_text()[-3000:])
    assert all(reason for reason in reasons)  # every skipped cycle says why
    print(f"\nfirst policy {first} after {rated} rated answers; skipped cycles: {reasons}")


def _ask_and_rate(client: httpx.Client, user: str | None, question: str,
                  rng: random.Random) -> int:
    body = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": question}], "n": 2, "max_tokens": 16,
        **({"user": user} if user else {})}).json()
    rated = 0
    for choice in body["choices"]:
        if user is None and rng.random() < 0.5:
            continue  # anonymous visitors rate now and then
        rating = "up" if choice["finish_reason"] == "stop" else "down"
        response = client.post("/v1/feedback", json={
            "completion_id": body["id"], "choice_index": choice["index"], "rating": rating,
            **({"user": user} if user else {})})
        assert response.status_code == 201, response.text
        rated += 1
    return rated


def _first_policy(client: httpx.Client) -> str | None:
    """The first version a cycle made (candidate, canary, active or rejected by the gate)."""
    for policy in client.get("/v1/policies").json()["data"]:
        if policy["id"] != "policy-0":
            return str(policy["id"])
    return None


def _train(client: httpx.Client, timeout: float = 600) -> None:
    """One cycle on what was rated so far, waited for."""
    started = client.post("/v1/training/runs")
    assert started.status_code in (200, 201, 202), started.text
    run_id = started.json()["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = next(r for r in client.get("/v1/training/runs").json()["data"]
                   if r["id"] == run_id)
        if run["status"] not in ("queued", "running"):
            return
        time.sleep(0.5)
    raise AssertionError(f"training run {run_id} never finished")
