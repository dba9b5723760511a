"""The CPU stack for real: `docker-compose --profile cpu up`, driven from 127.0.0.1 through nginx.

Needs a Docker engine and docker-compose; the images come from scripts/compose-images.sh (seconds
when they are built already; .ci/run builds them first). Without an engine the module skips,
unless FLYWHEEL_REQUIRE_DOCKER=1 (set by .ci/run), where that is a failure. The tests share one
stack, run in file order, and the last one takes it down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from tests.server.conftest import free_port
from tests.test_compose import COMPOSE_FILE, ROOT, compose_command

pytestmark = [pytest.mark.slow, pytest.mark.compose]

T = TypeVar("T")
USER_KEY, ADMIN_KEY = "compose-test-user", "compose-test-admin"
QUESTIONS = ["What is 2 plus 3?", "What is the capital of France?", "Hello!", "Name a color."]
# A cycle of seconds, as tests/test_up.py's: few feedback events, one tiny PPO step, a gate that
# lets the candidate through, and a short leader lock so a restarted worker leads again soon.
FAST_CYCLE = {
    "FLYWHEEL_TRAIN__MIN_NEW_FEEDBACK": "8", "FLYWHEEL_TRAIN__POLL_SECONDS": "0.5",
    "FLYWHEEL_TRAIN__EVAL_PROMPTS": "4", "FLYWHEEL_TRAIN__GATE_SAMPLES": "8",
    "FLYWHEEL_TRAIN__MIN_IMPROVEMENT": "-1e9", "FLYWHEEL_TRAIN__KL_BUDGET": "1e9",
    "FLYWHEEL_TRAIN__MIN_HOLDOUT_PAIRS": "1", "FLYWHEEL_TRAIN__REWARD_ACCURACY_FLOOR": "0",
    "FLYWHEEL_TRAIN__LOCK_TTL_SECONDS": "6",
    "FLYWHEEL_PPO__STEPS": "1", "FLYWHEEL_PPO__ROLLOUT_BATCH_SIZE": "4",
    "FLYWHEEL_PPO__PPO_EPOCHS": "1", "FLYWHEEL_PPO__NUM_MINIBATCHES": "1",
    "FLYWHEEL_PPO__MAX_NEW_TOKENS": "8", "FLYWHEEL_REWARD__EPOCHS": "1",
}
ONE_SHOT = {"migrate", "demo-model"}


def wait_until(condition: Callable[[], T | None], timeout: float, what: str,
               detail: Callable[[], str] = lambda: "") -> T:
    """Polls ``condition`` until it returns something other than None or False."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}\n{detail()}")
        time.sleep(0.5)


@dataclass
class Stack:
    """One compose project of the CPU profile, published on 127.0.0.1:port only."""

    project: str
    port: int
    command: list[str]
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def compose(self, *args: str, timeout: float = 600) -> str:
        result = subprocess.run([*self.command, *args], env=self.env, cwd=ROOT, text=True,
                                capture_output=True, timeout=timeout)
        assert result.returncode == 0, f"{args}: {result.stderr[-3000:]}"
        return result.stdout

    def logs(self, *services: str) -> str:
        result = subprocess.run([*self.command, "logs", "--no-color", "--tail", "40", *services],
                                env=self.env, cwd=ROOT, text=True, capture_output=True,
                                timeout=60)
        return result.stdout[-8000:]

    def containers(self, service: str | None = None) -> list[dict[str, Any]]:
        """`docker inspect` of the project's containers (of one service)."""
        labels = [f"label=com.docker.compose.project={self.project}"]
        if service:
            labels.append(f"label=com.docker.compose.service={service}")
        ids = subprocess.run(["docker", "ps", "-aq", *(f for lab in labels for f in
                                                       ("--filter", lab))],
                             capture_output=True, text=True, check=True).stdout.split()
        if not ids:
            return []
        out = subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True,
                             check=True).stdout
        return list(json.loads(out))

    def healthy(self) -> bool:
        """Every long-running service up (and healthy where it has a check), the one-shot
        services exited 0, and both replicas there."""
        containers = self.containers()
        services = [c["Config"]["Labels"]["com.docker.compose.service"] for c in containers]
        if services.count("server-cpu") != 2 or "worker-cpu" not in services:
            return False
        for container, service in zip(containers, services, strict=True):
            state = container["State"]
            if service in ONE_SHOT:
                assert state["Status"] != "exited" or state["ExitCode"] == 0, self.logs(service)
                if state["Status"] != "exited":
                    return False
            elif state["Status"] != "running" or \
                    state.get("Health", {}).get("Status", "healthy") != "healthy":
                return False
        return True

    def client(self, key: str = USER_KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {key}"})

    def served_by_each_replica(self) -> list[str]:
        """The version each server-cpu container serves, asked on its own loopback."""
        probe = ("import json, sys, urllib.request as u; r = u.Request("
                 "'http://127.0.0.1:8000/v1/models', headers={'Authorization': sys.argv[1]}); "
                 "print(json.load(u.urlopen(r, timeout=5))['data'][0]['policy_version'])")
        versions = []
        for container in self.containers("server-cpu"):
            result = subprocess.run(
                ["docker", "exec", container["Id"], "python3", "-c", probe,
                 f"Bearer {USER_KEY}"], capture_output=True, text=True, timeout=60)
            versions.append(result.stdout.strip() or f"error: {result.stderr[-300:]}")
        return versions


def docker_or_skip() -> list[str]:
    """docker-compose, with a running engine; else a skip (a failure where it is required)."""
    command = compose_command()
    if command is None:
        reason = "docker-compose is not installed"
    elif shutil.which("docker") is None or subprocess.run(
            ["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        reason = "no Docker engine answers `docker info`"
    else:
        return command
    if os.environ.get("FLYWHEEL_REQUIRE_DOCKER") == "1":
        pytest.fail(f"FLYWHEEL_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(f"{reason} (.ci/run installs and starts one)")


def build_images() -> dict[str, str]:
    """scripts/compose-images.sh: the image names it prints as .env lines."""
    result = subprocess.run(["bash", "scripts/compose-images.sh"], cwd=ROOT, text=True,
                            capture_output=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(line.split("=", 1) for line in result.stdout.split())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    command = docker_or_skip()
    images = build_images()
    tmp = tmp_path_factory.mktemp("compose")
    override = tmp / "fast-cycle.yml"
    override.write_text(yaml.safe_dump({"services": {"worker-cpu": {"environment": FAST_CYCLE}}}))
    env_file = tmp / "empty.env"  # an operator's .env in the checkout must not leak in
    env_file.write_text("")
    project = f"flywheeltest{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "COMPOSE_"))}
    port = free_port()
    # The test's client is an app backend vouching for its users: alone, an untrusted key's
    # feedback would count as nobody's (docs/raters.md).
    env.update(images, FLYWHEEL_API_KEYS=USER_KEY, FLYWHEEL_ADMIN_KEY=ADMIN_KEY,
               FLYWHEEL_TRUSTED_KEYS=USER_KEY,
               FLYWHEEL_PUBLIC_PORT=str(port), FLYWHEEL_DEMO_PRESET="tiny")
    stack = Stack(project, port, [*command, "--env-file", str(env_file), "-p", project,
                                  "-f", str(COMPOSE_FILE), "-f", str(override),
                                  "--profile", "cpu"], env)
    try:
        started = time.monotonic()
        stack.compose("up", "-d", "--no-build")
        wait_until(stack.healthy, 600, "every service healthy", stack.logs)
        print(f"compose stack healthy {time.monotonic() - started:.0f} s after `up`")
        yield stack
    finally:
        subprocess.run([*stack.command, "down", "-v", "--remove-orphans"], env=env, cwd=ROOT,
                       capture_output=True, timeout=300)


def test_stack_is_healthy_and_private(stack: Stack) -> None:
    published = {c["Config"]["Labels"]["com.docker.compose.service"]:
                 [b for bindings in (c["NetworkSettings"]["Ports"] or {}).values()
                  for b in bindings or []] for c in stack.containers()}
    assert {name for name, bindings in published.items() if bindings} == {"nginx"}
    assert {b["HostIp"] for b in published["nginx"]} == {"127.0.0.1"}
    assert httpx.get(stack.url + "/v1/models", timeout=30).status_code == 401
    with stack.client(ADMIN_KEY) as admin:
        for path in ("/metrics", "/docs"):
            response = admin.get(path)
            assert response.status_code == 404, path
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        models = admin.get("/v1/models").json()["data"]
    assert models[0]["policy_version"] == "policy-0"


def chat_and_rate(stack: Stack) -> None:
    """Twelve thumbs on six chats through nginx: more than the cycle's threshold of eight.
    Every answer can be rated, an answer holding a NUL character included (the tiny model emits
    one now and then; PostgreSQL stores it as U+FFFD). The shorter answer gets the thumb up: a
    taste a reward model can learn (thumbs by position would be noise, and a rater whose noise
    the trainer's review finds inverted loses its weight, and with it every pair that judges)."""
    with stack.client() as client:
        for i in range(6):
            response = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": QUESTIONS[i % 4]}],
                "n": 2, "max_tokens": 12})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["system_fingerprint"] == response.headers["X-Flywheel-Policy"]
            lengths = [len(c["message"]["content"]) for c in body["choices"]]
            ratings = ("up", "down") if lengths[0] <= lengths[1] else ("down", "up")
            for index, rating in enumerate(ratings):
                feedback = client.post("/v1/feedback", json={
                    "completion_id": body["id"], "choice_index": index, "rating": rating})
                assert feedback.status_code == 201, \
                    f"{feedback.text}\n{stack.logs('server-cpu', 'worker-cpu')}"


def last_run(stack: Stack) -> int:
    with stack.client(ADMIN_KEY) as admin:
        runs = admin.get("/v1/training/runs").json()["data"]
    return max((int(r["id"]) for r in runs), default=0)


def test_chat_feedback_and_a_cycle_reach_every_replica(stack: Stack) -> None:
    chat_and_rate(stack)
    new = wait_for_cycle(stack, after_run=0)
    versions = wait_until(lambda: (v := stack.served_by_each_replica()) and
                          set(v) == {new} and v, 120, f"both replicas on {new}",
                          lambda: str(stack.served_by_each_replica()))
    assert len(versions) == 2
    with stack.client() as client:
        answer = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 2})
    assert answer.headers["X-Flywheel-Policy"] == new


def wait_for_cycle(stack: Stack, after_run: int, timeout: float = 600) -> str:
    """The policy the first training run after ``after_run`` activated."""
    def finished() -> dict[str, Any] | None:
        with stack.client(ADMIN_KEY) as admin:
            runs = [r for r in admin.get("/v1/training/runs").json()["data"]
                    if int(r["id"]) > after_run]
        done = sorted((r for r in runs if r["status"] not in ("queued", "running")),
                      key=lambda r: int(r["id"]))
        if done:
            assert done[0]["status"] == "succeeded", f"{done[0]}\n{stack.logs('worker-cpu')}"
            return dict(done[0])
        return None

    wait_until(finished, timeout, "a training cycle", lambda: stack.logs("worker-cpu"))
    return active_policy(stack)


def active_policy(stack: Stack) -> str:
    with stack.client(ADMIN_KEY) as admin:
        policies = admin.get("/v1/policies").json()["data"]
    return str(next(p["id"] for p in policies if p["status"] == "active"))


def chat_ok(stack: Stack) -> bool:
    with stack.client() as client:
        response = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 2})
    assert response.status_code == 200, f"{response.text}\n{stack.logs('nginx')}"
    return True


def crash(container: dict[str, Any]) -> int:
    """SIGKILL to the container's main process from the host: a crash, which the restart policy
    answers (`docker kill` counts as a deliberate stop and is not restarted). Returns the
    restart count before it."""
    os.kill(int(container["State"]["Pid"]), signal.SIGKILL)
    return int(container["RestartCount"])


def test_a_killed_replica_is_routed_around_and_restarted(stack: Stack) -> None:
    victim = stack.containers("server-cpu")[0]
    restarts = crash(victim)

    def now() -> dict[str, Any]:
        (container,) = [c for c in stack.containers("server-cpu") if c["Id"] == victim["Id"]]
        return container

    # Docker restarts the container at once; its server then takes seconds to listen and load.
    # Meanwhile nginx sends every request to the other replica. (A request that reached the
    # process in the instant it died is lost with it, as with any crash.)
    wait_until(lambda: now()["RestartCount"] > restarts, 60, "the killed replica restarted")
    for _ in range(20):
        chat_ok(stack)
    wait_until(lambda: now()["State"].get("Health", {}).get("Status") == "healthy", 300,
               "the restarted replica healthy", stack.logs)
    # It starts on the active version (read from Redis), not on the base model.
    active = active_policy(stack)
    assert stack.served_by_each_replica() == [active, active]


def test_a_database_outage_keeps_completions_and_503s_feedback(stack: Stack) -> None:
    with stack.client() as client:
        completion = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 4}).json()
        rating = {"completion_id": completion["id"], "choice_index": 0, "rating": "up"}
        stack.compose("stop", "postgres")
        try:
            chat_ok(stack)
            refused = client.post("/v1/feedback", json=rating)
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["Retry-After"]) > 0
            assert refused.json()["error"]["type"] == "service_unavailable_error"
        finally:
            stack.compose("start", "postgres")
        wait_until(lambda: client.post("/v1/feedback", json=rating).status_code == 201, 120,
                   "feedback accepted again once PostgreSQL is back", stack.logs)
        chat_ok(stack)


def test_a_worker_killed_mid_cycle_fails_its_run_and_the_next_cycle_runs(
        stack: Stack, tmp_path: Any) -> None:
    # The stack's cycles take seconds, too short to catch one running; this worker's never ends.
    endless = tmp_path / "endless-cycle.yml"
    endless.write_text(yaml.safe_dump(
        {"services": {"worker-cpu": {"environment": {"FLYWHEEL_PPO__STEPS": "1000000"}}}}))
    stack.compose("-f", str(endless), "up", "-d", "--no-deps", "--no-build", "worker-cpu")
    before = last_run(stack)
    chat_and_rate(stack)  # new feedback: the worker starts a cycle by itself

    def running() -> dict[str, Any] | None:
        with stack.client(ADMIN_KEY) as admin:
            runs = [r for r in admin.get("/v1/training/runs").json()["data"]
                    if int(r["id"]) > before]
        assert all(r["status"] in ("queued", "running") for r in runs), runs
        return next((dict(r) for r in runs if r["status"] == "running"), None)

    run = wait_until(running, 300, "a cycle running", lambda: stack.logs("worker-cpu"))
    (worker,) = stack.containers("worker-cpu")
    crash(worker)

    def failed() -> bool:
        with stack.client(ADMIN_KEY) as admin:
            row = admin.get(f"/v1/training/runs/{run['id']}").json()
        return bool(row["status"] == "failed")

    wait_until(failed, 300, f"the abandoned run {run['id']} marked failed",
               lambda: stack.logs("worker-cpu"))
    # Back to the stack's fast cycles: the endless worker, restarted by Docker, may have begun a
    # second endless run, which it cancels when stopped (or the fast worker finds abandoned and
    # fails). The feedback of those runs is still new, and the fast worker trains on it.
    stack.compose("up", "-d", "--no-deps", "--no-build", "worker-cpu")

    def succeeded() -> bool:
        with stack.client(ADMIN_KEY) as admin:
            later = sorted((r for r in admin.get("/v1/training/runs").json()["data"]
                            if int(r["id"]) > int(run["id"])), key=lambda r: int(r["id"]))
        # A skip consumes the feedback it skipped on: no cycle would follow. Say so at once.
        assert all(r["status"] != "skipped" for r in later), later
        if not later or later[-1]["status"] != "succeeded":
            return False
        assert all(r["status"] in ("cancelled", "failed") for r in later[:-1]), later
        return True

    wait_until(succeeded, 600, "a cycle succeeding after the crash",
               lambda: stack.logs("worker-cpu"))


def test_down_removes_everything(stack: Stack) -> None:
    stack.compose("down", "-v", "--remove-orphans")
    label = f"label=com.docker.compose.project={stack.project}"
    for kind in (["ps", "-a"], ["volume", "ls"], ["network", "ls"]):
        listed = subprocess.run(["docker", *kind, "-q", "--filter", label],
                                capture_output=True, text=True, check=True).stdout.split()
        assert listed == [], kind
    with pytest.raises(httpx.TransportError):
        httpx.get(stack.url + "/nginx-health", timeout=5)
