"""`flywheel up` decides canaries from live thumbs: a simulated user over HTTP, a worse canary
rejected and a better one promoted by the worker, end to end.

The user's taste (of our own design, not the demo's judge): thumbs up for an answer that ends by
itself within 24 tokens, down for one cut off. Versions differ in how often they stop: the base
model stops about 78% of the time; copies with noise on every weight stop less often (scale 0.6:
about 40%, scale 3: about 3%, measured on the tiny preset).
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from feedback_store import Store
from tests.helpers import make_checkpoint, up_env
from tests.server.conftest import free_port, wait_ready

pytestmark = pytest.mark.slow

QUESTIONS = ["What is 2 plus 3?", "Hello!", "Name a color.", "What is the capital of France?"]
USERS = [f"user-{i}" for i in range(40)]


def rate_round(client: httpx.Client, user: str, question: str) -> str:
    """One request of four answers, each rated by the user's taste; returns the version."""
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": question}], "n": 4, "max_tokens": 24,
        "user": user})
    assert response.status_code == 200, response.text
    body = response.json()
    for choice in body["choices"]:
        rating = "up" if choice["finish_reason"] == "stop" else "down"
        feedback = client.post("/v1/feedback", json={
            "completion_id": body["id"], "choice_index": choice["index"], "rating": rating,
            "user": user})
        assert feedback.status_code == 201, feedback.text
    return str(body["system_fingerprint"])


def status_of(client: httpx.Client, version: str) -> dict:
    policies = client.get("/v1/policies").json()["data"]
    return next(p for p in policies if p["id"] == version)


def rate_until(client: httpx.Client, version: str, status: str, timeout: float) -> dict:
    rounds = zip(itertools.cycle(USERS), itertools.cycle(QUESTIONS), strict=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _ in range(10):
            rate_round(client, *next(rounds))
        row = status_of(client, version)
        if row["status"] == status:
            return row
    raise AssertionError(f"{version} never became {status}: {status_of(client, version)}")


def test_up_rejects_a_worse_canary_and_promotes_a_better_one(tmp_path: Path,
                                                             tiny_model_dir: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = up_env(tiny_model_dir, FLYWHEEL_CANARY__MIN_RATINGS="40",
                 FLYWHEEL_TRAIN__MIN_NEW_FEEDBACK="1000000")  # no training: only the rollout
    versions = {"policy-1": 0.6, "policy-2": 3.0, "policy-3": None}  # None: the base weights
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flywheel.cli", "up", "--port", str(port), "--data-dir",
         str(data)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=180)
        store = Store(f"sqlite:///{data / 'flywheel.db'}")
        for n, (version, scale) in enumerate(versions.items(), start=1):
            make_checkpoint(tiny_model_dir, data / "checkpoints" / "policies" / version, version,
                            parent="policy-0", perturb_seed=None if scale is None else n,
                            perturb_scale=scale or 0.0, store=store)
        store.close()
        with httpx.Client(base_url=url, timeout=120) as client:
            # An operator activates a worse version by mistake; nobody has rated anything yet.
            assert client.post("/v1/policies/policy-1/activate").status_code == 200
            assert client.post("/v1/policies/policy-2/canary",
                               json={"fraction": 0.5}).status_code == 201
            rejected = rate_until(client, "policy-2", "rejected", timeout=240)
            evidence = rejected["metrics"]
            assert evidence["canary/decision"] == "rejected"
            assert evidence["canary/high"] < 0 <= evidence["canary/active_approval"]
            assert {rate_round(client, u, QUESTIONS[0]) for u in USERS[:10]} == {"policy-1"}

            assert client.post("/v1/policies/policy-3/canary",
                               json={"fraction": 0.5}).status_code == 201
            promoted = rate_until(client, "policy-3", "active", timeout=240)
            assert promoted["metrics"]["canary/decision"] == "promoted"
            assert promoted["metrics"]["canary/low"] > -0.02
            assert {rate_round(client, u, QUESTIONS[1]) for u in USERS[:10]} == {"policy-3"}
            live = {p["id"]: p["live"] for p in client.get("/v1/policies").json()["data"]}
            assert live["policy-3"]["approval"] > live["policy-1"]["approval"]
            assert client.get("/readyz").json()["regression"] is None
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
