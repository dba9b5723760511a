"""`flywheel up` end to end: serve, take feedback, train, hot-swap, and stop cleanly on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import up_env
from tests.server.conftest import free_port, wait_ready

pytestmark = pytest.mark.slow

# "user: What is 2 plus 3?" (the stored prompt text) falls in the held-out split, the rest not.
QUESTIONS = ["What is 2 plus 3?", "What is the capital of France?", "Hello!", "Name a color."]


def test_up_closes_the_loop_and_stops_cleanly(tmp_path: Path, tiny_model_dir: Path) -> None:
    close_the_loop(tmp_path, tiny_model_dir)


def close_the_loop(tmp_path: Path, model: Path, *, ready_s: float = 180, train_s: float = 300,
                   stop_s: float = 60, **env_overrides: str) -> str:
    """Run `flywheel up` on ``model``: feedback, a cycle, policy-1 served, a clean Ctrl-C with no
    child left; returns its log."""
    port = free_port()
    env = up_env(model, FLYWHEEL_TRAIN__MIN_NEW_FEEDBACK="8",
                 FLYWHEEL_TRAIN__EVAL_PROMPTS="4", FLYWHEEL_TRAIN__MIN_IMPROVEMENT="-1e9",
                 FLYWHEEL_TRAIN__KL_BUDGET="1e9", FLYWHEEL_TRAIN__MIN_HOLDOUT_PAIRS="1",
                 FLYWHEEL_TRAIN__REWARD_ACCURACY_FLOOR="0", FLYWHEEL_TRAIN__GATE_SAMPLES="8",
                 FLYWHEEL_PPO__STEPS="1", FLYWHEEL_PPO__ROLLOUT_BATCH_SIZE="4",
                 FLYWHEEL_PPO__PPO_EPOCHS="1", FLYWHEEL_PPO__NUM_MINIBATCHES="1",
                 FLYWHEEL_PPO__MAX_NEW_TOKENS="8", FLYWHEEL_REWARD__EPOCHS="1", **env_overrides)
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flywheel.cli", "up", "--port", str(port),
         "--data-dir", str(tmp_path / "data")],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=ready_s)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # redis-server, the server and the worker
        with httpx.Client(base_url=url, timeout=120) as client:
            for i in range(6):
                body = client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": QUESTIONS[i % 4]}],
                    "n": 2, "max_tokens": 12}).json()
                assert body["system_fingerprint"] == "policy-0"
                for index, rating in enumerate(("up", "down")):
                    assert client.post("/v1/feedback", json={
                        "completion_id": body["id"], "choice_index": index,
                        "rating": rating}).status_code == 201
            served = _wait_for_new_policy(client, timeout=train_s)
        assert served == "policy-1"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=stop_s)
    text = (tmp_path / "up.log").read_text()
    assert code == 0, text[-3000:]
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    return text


def _wait_for_new_policy(client: httpx.Client, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.get("/v1/training/runs").json()["data"]
        if runs and runs[0]["status"] == "failed":
            raise AssertionError(f"training failed: {runs[0]['error']}")
        answer = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 2}).json()
        if answer["system_fingerprint"] != "policy-0":
            return str(answer["system_fingerprint"])
        time.sleep(1.0)
    raise AssertionError("no new policy served in time")
