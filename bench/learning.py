"""The loop, end to end: a simulated user chats with a running Flywheel over HTTP only.

It asks questions, rates every answer with thumbs (and ranks the n answers of each request), and
the worker retrains and hot-swaps new policies. The approval rate of each served policy version
is printed and plotted (PNG). Target: +40 points of approval over the base policy within 10
minutes on 2 CPU cores, with the KL to the reference bounded.

    python bench/learning.py --minutes 10 --out bench/out
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from flywheel.demo_model import build_demo_model
from flywheel.demo_model.judge import judge_answer, sample_user_prompt, score_answer


@dataclass
class VersionStats:
    approved: int = 0
    answers: int = 0
    first_seen: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        return self.approved / self.answers if self.answers else 0.0


@dataclass
class SimulatedUser:
    """Asks, judges each answer by its own taste, and says so through the feedback API."""

    client: httpx.AsyncClient
    rng: random.Random
    n: int
    stats: dict[str, VersionStats] = field(default_factory=lambda: defaultdict(VersionStats))
    timeline: list[tuple[float, str, float]] = field(default_factory=list)
    failures: int = 0

    async def turn(self, started: float) -> None:
        prompt = sample_user_prompt(self.rng)
        response = await self.client.post("/v1/chat/completions", json={
            "model": "flywheel", "messages": [{"role": "user", "content": prompt}],
            "n": self.n, "max_tokens": 48, "temperature": 1.0,
        })
        if response.status_code != 200:
            self.failures += 1
            return
        body = response.json()
        version = body["system_fingerprint"]
        answers = [c["message"]["content"] for c in body["choices"]]
        verdicts = [judge_answer(prompt, a) for a in answers]
        record = self.stats[version]
        record.answers += len(answers)
        record.approved += sum(verdicts)
        self.timeline.append((time.monotonic() - started, version, sum(verdicts) / len(answers)))
        for index, approved in enumerate(verdicts):
            await self.client.post("/v1/feedback", json={
                "completion_id": body["id"], "choice_index": index,
                "rating": "up" if approved else "down", "user": "simulated"})
        scores = [score_answer(prompt, a) for a in answers]
        if len(set(scores)) > 1:
            order = sorted(range(len(answers)), key=lambda i: -scores[i])
            await self.client.post("/v1/rankings", json={"completion_id": body["id"],
                                                          "ranking": order})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_system(data_dir: Path, model_dir: Path, port: int, min_feedback: int
                 ) -> subprocess.Popen[bytes]:
    env = dict(os.environ, FLYWHEEL_MODEL=str(model_dir),
               FLYWHEEL_TRAIN__MIN_NEW_FEEDBACK=str(min_feedback),
               FLYWHEEL_LOG_LEVEL="info")
    env.pop("FLYWHEEL_REDIS_URL", None)
    log = (data_dir / "flywheel-up.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "flywheel.cli", "up", "--port", str(port),
                             "--data-dir", str(data_dir)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("flywheel up exited; see flywheel-up.log")
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("server not ready in time")


async def simulate(url: str, minutes: float, concurrency: int, n: int, seed: int
                   ) -> SimulatedUser:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        user = SimulatedUser(client, random.Random(seed), n)
        started = time.monotonic()
        deadline = started + minutes * 60

        async def loop() -> None:
            while time.monotonic() < deadline:
                try:
                    await user.turn(started)
                except httpx.HTTPError:
                    user.failures += 1
                    await asyncio.sleep(0.5)

        reporter = asyncio.create_task(report(user, started, deadline))
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        reporter.cancel()
        return user


async def report(user: SimulatedUser, started: float, deadline: float) -> None:
    while time.monotonic() < deadline:
        await asyncio.sleep(30)
        line = ", ".join(f"{v}: {s.rate:.0%} of {s.answers}" for v, s in user.stats.items())
        print(f"[{time.monotonic() - started:5.0f}s] approval {line}", flush=True)


async def policy_table(url: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        return (await client.get("/v1/policies")).json()["data"]


def plot(user: SimulatedUser, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = sorted(user.stats, key=lambda v: int(v.split("-")[-1]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(versions, [100 * user.stats[v].rate for v in versions], color="#4a7")
    left.set_ylabel("approval (%)")
    left.set_title("Approval of each served policy")
    left.set_ylim(0, 100)
    window = 40
    times = [t for t, _, _ in user.timeline]
    rates = [r for _, _, r in user.timeline]
    smooth = [100 * sum(rates[max(0, i - window):i + 1]) / len(rates[max(0, i - window):i + 1])
              for i in range(len(rates))]
    right.plot([t / 60 for t in times], smooth, color="#247")
    right.set_xlabel("minutes")
    right.set_ylabel(f"approval (%), last {window} requests")
    right.set_title("Approval over time")
    right.set_ylim(0, 100)
    fig.tight_layout()
    path = out / "learning.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default=".flywheel/models/base")
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--n", type=int, default=2, help="answers per request (ranked)")
    parser.add_argument("--min-feedback", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model_dir = Path(args.model).resolve()
    if not (model_dir / "config.json").exists():
        print(f"building the demo model into {model_dir}", flush=True)
        build_demo_model(model_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="flywheel-learning-") as tmp:
        proc = start_system(Path(tmp), model_dir, port, args.min_feedback)
        try:
            asyncio.run(wait_ready(url, proc))
            user = asyncio.run(simulate(url, args.minutes, args.concurrency, args.n, args.seed))
            policies = asyncio.run(policy_table(url))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        print_summary(user, policies)
        print(f"plot: {plot(user, out)}")
    return 0


def print_summary(user: SimulatedUser, policies: list[dict]) -> None:
    kl = {p["id"]: (p.get("metrics") or {}).get("gate/candidate_kl_ref") for p in policies}
    status = {p["id"]: p["status"] for p in policies}
    print(f"{'version':<10} {'status':<9} {'answers':>7} {'approval':>8} {'KL to base':>10}")
    for version in sorted(user.stats, key=lambda v: int(v.split("-")[-1])):
        s = user.stats[version]
        kl_text = f"{kl[version]:.2f}" if kl.get(version) is not None else "-"
        print(f"{version:<10} {status.get(version, '?'):<9} {s.answers:>7} {s.rate:>8.1%} "
              f"{kl_text:>10}")
    base = user.stats.get("policy-0", VersionStats()).rate
    measured = [v for v in user.stats if user.stats[v].answers >= 20]
    last = max(measured, key=lambda v: int(v.split("-")[-1]), default="policy-0")
    final = user.stats[last].rate if last in user.stats else base
    best = max((user.stats[v].rate for v in measured), default=base)
    print(f"learning: approval {base:.1%} (policy-0) -> {final:.1%} ({last}, the last served), "
          f"{100 * (final - base):+.1f} points (target >= +40); best version {best:.1%}; "
          f"failed requests {user.failures}")
    rejected = [p["id"] for p in policies if p["status"] == "rejected"]
    if rejected:
        print(f"rejected by the gate: {', '.join(rejected)}")


if __name__ == "__main__":
    sys.exit(main())
