"""The loop, end to end: simulated users with a taste of their own chat with Flywheel over HTTP.

    python bench/learning.py --taste terse --minutes 10
    python bench/learning.py --taste foodie --minutes 10 --set CANARY__MIN_RATINGS=60
    python bench/learning.py --taste terse --users 3 --paced 50 --max-rated 700 --minutes 20

A pool of simulated users (the `user` field, so the canary split is sticky) asks the demo
model's kinds of questions, gives thumbs to every answer by a taste from bench/tastes.py (never
the demo model's own judge, which the demo was tuned for) and ranks the answers of each request,
tied answers in one group. `flywheel up` retrains, gates, canaries and promotes by itself.

Printed: the settings passed to `flywheel up`; approval per policy version, counted by the taste
on the answers each version served and by the server (`live` in GET /v1/policies); the best-seen
version, the final (active at the end) one and the gap between them; each version's status,
canary decision and evidence (`canary/*`) and KL to the base; every training cycle with its
outcome and reasons (GET /v1/training/runs); failed requests. Plot: docs/learning-<taste>.png.

`--paced 50` (bench/_pacing.py): the users stop after every 50 rated answers until a cycle queued
on them has finished, and the run prints the rated answers at the first policy, the first canary
and the first promotion: counts that do not depend on this machine's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _pacing import (
    FEEDBACK_TRIGGER_OFF,
    Milestones,
    Pacer,
    RatedLedger,
    print_paced,
    watch_milestones,
)
from tastes import TASTES, RankKey, Taste

from feedback_store.training_data import is_holdout_hash
from flywheel.demo_model import build_demo_model
from flywheel.demo_model.judge import sample_user_prompt

MIN_ANSWERS = 60  # a version needs this many rated answers to be called best-seen
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class VersionStats:
    approved: int = 0
    answers: int = 0
    first_seen: float = 0.0  # seconds into the run
    # By the answer's first word (the demo corpus's style marker): answers, approved.
    openings: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    @property
    def rate(self) -> float:
        return self.approved / self.answers if self.answers else 0.0


@dataclass
class SimulatedUsers:
    """Ask as one of `users`, judge each answer by `taste`, and say so through the API."""

    client: httpx.AsyncClient
    taste: Taste
    rng: random.Random
    n: int
    users: list[str]
    started: float = field(default_factory=time.monotonic)
    stats: dict[str, VersionStats] = field(default_factory=dict)
    timeline: list[tuple[float, str, int, int]] = field(default_factory=list)  # t, v, up, n
    prompts: dict[str, bool] = field(default_factory=dict)  # stored text -> held out
    failed: Counter[str] = field(default_factory=Counter)
    rankings: Counter[str] = field(default_factory=Counter)
    ledger: RatedLedger = field(default_factory=RatedLedger)  # thumbs the server accepted

    async def turn(self) -> None:
        prompt, user = sample_user_prompt(self.rng), self.rng.choice(self.users)
        stored = f"user: {prompt}"  # how the server stores a one-message chat's prompt text
        self.prompts[stored] = is_holdout_hash(hashlib.sha256(stored.encode()).hexdigest())
        response = await self.client.post("/v1/chat/completions", json={
            "model": "flywheel", "messages": [{"role": "user", "content": prompt}],
            "n": self.n, "max_tokens": 48, "temperature": 1.0, "user": user})
        if response.status_code != 200:
            self.failed["chat"] += 1
            return
        body = response.json()
        now = time.monotonic() - self.started
        answers = [c["message"]["content"] for c in body["choices"]]
        verdicts = [self.taste.approve(prompt, a) for a in answers]
        # Each answer's version: a canary assigned per request splits a request between arms.
        versions = [c.get("policy_version", body["system_fingerprint"]) for c in body["choices"]]
        for version in sorted(set(versions)):
            mine = [(a, up) for a, up, v in zip(answers, verdicts, versions, strict=True)
                    if v == version]
            record = self.stats.setdefault(version, VersionStats(first_seen=now))
            record.answers += len(mine)
            record.approved += sum(up for _, up in mine)
            self.timeline.append((now, version, sum(up for _, up in mine), len(mine)))
            for answer, up in mine:
                cell = record.openings[(answer.split() or [""])[0]]
                cell[0], cell[1] = cell[0] + 1, cell[1] + up
        for index, up in enumerate(verdicts):
            if await self._post("feedback", "/v1/feedback", {
                    "completion_id": body["id"], "choice_index": index,
                    "rating": "up" if up else "down", "user": user}):
                self.ledger.add()
        ranking = ranking_with_ties([self.taste.rank_key(prompt, a) for a in answers])
        if ranking is not None:
            self.rankings["with ties" if any(isinstance(e, list) for e in ranking)
                          else "strict"] += 1
            await self._post("ranking", "/v1/rankings", {
                "completion_id": body["id"], "ranking": ranking, "user": user})

    async def _post(self, kind: str, path: str, payload: dict[str, Any]) -> bool:
        if (await self.client.post(path, json=payload)).status_code != 201:
            self.failed[kind] += 1
            return False
        return True


def ranking_with_ties(keys: list[RankKey]) -> list[int | list[int]] | None:
    """Best first, equal keys in one group (`[[0, 2], 1]`); None when all answers tie."""
    tiers = sorted(set(keys), reverse=True)
    if len(tiers) < 2:
        return None
    groups = [[i for i, k in enumerate(keys) if k == tier] for tier in tiers]
    return [g[0] if len(g) == 1 else g for g in groups]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flywheel_env(model_dir: Path, min_feedback: int, overrides: list[str], paced: bool = False
                 ) -> dict[str, str]:
    """The environment of `flywheel up`: ours plus `--set KEY=VALUE` (as FLYWHEEL_KEY). Paced:
    no cycle on feedback (the bench queues them), and the worker looks for one twice a second."""
    env = dict(os.environ, FLYWHEEL_MODEL=str(model_dir),
               FLYWHEEL_TRAIN__MIN_NEW_FEEDBACK=FEEDBACK_TRIGGER_OFF if paced
               else str(min_feedback))
    if paced:
        env["FLYWHEEL_TRAIN__POLL_SECONDS"] = "0.5"
    env.pop("FLYWHEEL_REDIS_URL", None)
    for item in overrides:
        key, _, value = item.partition("=")
        env["FLYWHEEL_" + key.upper().removeprefix("FLYWHEEL_")] = value
    return env


def start_system(data_dir: Path, env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
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


@dataclass
class Watch:
    """What the server said over the run: status changes of versions, finished cycles."""

    events: list[tuple[float, str, str]] = field(default_factory=list)  # t, version, status
    status: dict[str, str] = field(default_factory=dict)
    runs_seen: set[int] = field(default_factory=set)
    warned: bool = False
    waiting: list[str] = field(default_factory=list)  # what each waiting version waits for

    async def poll(self, client: httpx.AsyncClient, now: float) -> None:
        policies = (await client.get("/v1/policies")).json()["data"]
        self.waiting = [f"{p['id']} ({p['status']}) waits: {p['reason']}"
                        for p in policies if p.get("reason")]
        for p in policies:
            if self.status.get(p["id"]) != p["status"]:
                self.status[p["id"]] = p["status"]
                self.events.append((now, p["id"], p["status"]))
                print(f"[{now:5.0f}s] {p['id']} is {p['status']}", flush=True)
        runs = (await client.get("/v1/training/runs", params={"limit": 500})).json()["data"]
        for run in sorted(runs, key=lambda r: r["id"]):
            if run["status"] in ("succeeded", "skipped", "rejected", "failed") and (
                    run["id"] not in self.runs_seen):
                self.runs_seen.add(run["id"])
                print(f"[{now:5.0f}s] cycle {run['id']} {run['status']}: {run_reason(run)}",
                      flush=True)
        done = [r for r in runs if r["id"] in self.runs_seen]
        if not self.warned and now > 120 and len(done) >= 2 and all(
                r["status"] in ("skipped", "failed") for r in done):
            self.warned = True
            print(f"[{now:5.0f}s] WARNING: every cycle so far was skipped or failed", flush=True)


def run_reason(run: dict[str, Any]) -> str:
    m = run.get("metrics") or {}
    if run["status"] == "skipped":
        return str(m.get("cycle/skip_reason"))
    if run["status"] == "failed":
        return str(run.get("error"))[:200]
    parts = [f"{run.get('policy_id')}"]
    if m.get("gate/reasons"):
        parts.append("gate: " + "; ".join(m["gate/reasons"]))
    if "gate/score_gain_low" in m:
        parts.append(f"RM gain low {m['gate/score_gain_low']:.3f}, KL "
                     f"{m.get('gate/candidate_kl_ref', float('nan')):.2f}")
    if "reward/accuracy" in m:
        parts.append(f"RM held-out acc {m['reward/accuracy']:.2f} on "
                     f"{m.get('reward/holdout_pairs', 0):.0f} pairs")
    if m.get("cycle/release"):
        parts.append(f"release: {m['cycle/release']}")
    return ", ".join(parts)


async def simulate(url: str, taste: Taste, args: argparse.Namespace
                   ) -> tuple[SimulatedUsers, Watch, Milestones]:
    users = [f"user-{i:03d}" for i in range(args.users)]
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        sim = SimulatedUsers(client, taste, random.Random(args.seed), args.n, users)
        watch, deadline = Watch(), sim.started + args.minutes * 60
        milestones = Milestones()
        pacer = Pacer(args.paced or 10**9, args.max_rated or 10**9)

        def going() -> bool:  # paced, the pacer ends the run after the last batch's cycle
            return (time.monotonic() < deadline and not pacer.finished and (
                args.paced or sim.ledger.rated < (args.max_rated or 10**9)))

        async def loop() -> None:
            while going():
                if args.paced and not await pacer.admit(args.n):
                    return
                try:
                    await sim.turn()
                except httpx.HTTPError:
                    sim.failed["http error"] += 1
                    await asyncio.sleep(0.5)
                finally:
                    if args.paced:
                        await pacer.leave()
            await pacer.end()

        async def monitor() -> None:
            last = 0.0
            while going():
                now = time.monotonic() - sim.started
                with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                    await watch.poll(client, now)  # a missed poll is caught up by the next
                if now - last >= 30:
                    last = now
                    line = ", ".join(f"{v}: {s.rate:.0%} of {s.answers}"
                                     for v, s in sim.stats.items())
                    held = sum(sim.prompts.values())
                    print(f"[{now:5.0f}s] approval {line}; prompts {len(sim.prompts)} distinct, "
                          f"{held} held out; {sim.ledger.rated} rated answers", flush=True)
                    for p in watch.waiting:
                        print(f"[{now:5.0f}s]   {p}", flush=True)
                await asyncio.sleep(5)

        helpers = [asyncio.create_task(monitor())]
        if args.paced:
            helpers += [asyncio.create_task(pacer.pace(client, sim.ledger, milestones, deadline)),
                        asyncio.create_task(watch_milestones(client, sim.ledger, milestones,
                                                             pacer))]
        await asyncio.gather(*(loop() for _ in range(args.concurrency)))
        await pacer.end()
        await asyncio.gather(*helpers[1:])
        helpers[0].cancel()
        await watch.poll(client, time.monotonic() - sim.started)
        milestones.observe((await client.get("/v1/policies")).json()["data"], sim.ledger)
        return sim, watch, milestones


async def fetch_final(url: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        policies = (await client.get("/v1/policies")).json()
        runs = (await client.get("/v1/training/runs", params={"limit": 500})).json()["data"]
        return policies, runs


def _num(v: str) -> int:
    return int(v.split("-")[-1])


def summarize(sim: SimulatedUsers, policies: dict[str, Any], runs: list[dict[str, Any]]
              ) -> dict[str, Any]:
    rows = {p["id"]: p for p in policies["data"]}
    versions = sorted(set(rows) | set(sim.stats), key=_num)
    table = []
    for v in versions:
        s, p = sim.stats.get(v, VersionStats()), rows.get(v, {})
        m, live = p.get("metrics") or {}, p.get("live") or {}
        table.append({
            "version": v, "status": p.get("status", "?"), "answers": s.answers,
            "approval": s.rate if s.answers else None, "live_ratings": live.get("ratings"),
            "live_approval": live.get("approval"), "live_interval": live.get("interval"),
            "kl": 0.0 if v == "policy-0" else m.get("gate/candidate_kl_ref"),
            "canary": {k: val for k, val in m.items() if k.startswith("canary/")},
            "rollback": {k: val for k, val in m.items() if k.startswith("rollback/")},
            "first_served_s": s.first_seen if s.answers else None,
            "openings": dict(sorted(s.openings.items(), key=lambda kv: -kv[1][0]))})
    measured = [r for r in table if r["answers"] >= MIN_ANSWERS]
    best = max(measured, key=lambda r: r["approval"], default=None)
    final = next((r for r in table if r["status"] == "active"), None)
    gap = (best["approval"] - final["approval"]
           if best and final and final["approval"] is not None else None)
    return {"versions": table, "best": best, "final": final, "gap": gap,
            "server_best": policies.get("best"), "regression": policies.get("regression"),
            "runs": sorted(runs, key=lambda r: r["id"]),
            "run_counts": dict(Counter(r["status"] for r in runs)),
            "failed": dict(sim.failed), "rankings": dict(sim.rankings),
            "prompts": {"distinct": len(sim.prompts), "held_out": sum(sim.prompts.values())}}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_summary(summary: dict[str, Any], taste: Taste, settings: dict[str, str],
                  wall: float) -> None:
    print(f"\ntaste {taste.name}: {taste.summary}")
    print("settings passed to flywheel up: "
          + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    print(f"\n{'version':<10} {'status':<10} {'answers':>7} {'approval':>8} {'live':>14} "
          f"{'KL':>5}  canary decision")
    for r in summary["versions"]:
        c = r["canary"]
        decision = (f"{c.get('canary/decision')} vs {c.get('canary/against')}: "
                    f"{c.get('canary/active_ratings')}/{c.get('canary/canary_ratings')} ratings, "
                    f"diff {c.get('canary/difference', float('nan')):+.3f} "
                    f"[{c.get('canary/low', float('nan')):+.3f}, "
                    f"{c.get('canary/high', float('nan')):+.3f}]" if c else "-")
        if r["rollback"]:
            decision += f"; rollback {r['rollback']}"
        live = f"{_pct(r['live_approval'])} of {r['live_ratings'] or 0}"
        kl = "-" if r["kl"] is None else f"{r['kl']:.2f}"
        print(f"{r['version']:<10} {r['status']:<10} {r['answers']:>7} {_pct(r['approval']):>8} "
              f"{live:>14} {kl:>5}  {decision}")
    print("\nfirst word of the answers (share of the version's answers, approved among them):")
    for r in summary["versions"]:
        if r["answers"]:
            print(f"  {r['version']:<10} " + ", ".join(
                f"{w!r} {n / r['answers']:.0%} ({up / n:.0%} up)"
                for w, (n, up) in list(r["openings"].items())[:6]))
    best, final = summary["best"], summary["final"]
    print(f"\nbest-seen: {best and best['version']} at {_pct(best and best['approval'])}; "
          f"final (active at the end): {final and final['version']} at "
          f"{_pct(final and final['approval'])}, KL to base "
          f"{'-' if not final or final['kl'] is None else format(final['kl'], '.2f')}; gap "
          f"{'-' if summary['gap'] is None else format(100 * summary['gap'], '+.1f')} points; "
          f"server's best {summary['server_best']}, regression {summary['regression']}")
    print(f"cycles: {summary['run_counts']}")
    for run in summary["runs"]:
        print(f"  run {run['id']:>3} {run['status']:<9} {run_reason(run)}")
    print(f"prompts asked: {summary['prompts']['distinct']} distinct, "
          f"{summary['prompts']['held_out']} in the held-out split; rankings sent: "
          f"{summary['rankings']}; failed requests: {summary['failed'] or 0}; "
          f"wall time {wall:.0f} s")


def plot(sim: SimulatedUsers, watch: Watch, summary: dict[str, Any], taste: Taste,
         path: Path, bin_s: float = 20.0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["versions"] if r["answers"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = {r["version"]: plt.cm.tab10(i % 10) for i, r in enumerate(rows)}
    left.bar([r["version"] for r in rows], [100 * r["approval"] for r in rows],
             color=[colors[r["version"]] for r in rows])
    for i, r in enumerate(rows):
        left.text(i, 100 * r["approval"] + 2, f"{r['status']}\n{r['answers']}", ha="center",
                  fontsize=7)
    left.set(ylabel="approval by the user's taste (%)", ylim=(0, 105),
             title=f"Approval of each served policy ({taste.name})")
    bins: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for t, v, up, n in sim.timeline:
        cell = bins[v][int(t // bin_s)]
        cell[0], cell[1] = cell[0] + up, cell[1] + n
    for v, cells in sorted(bins.items(), key=lambda kv: _num(kv[0])):
        keys = sorted(k for k, c in cells.items() if c[1] >= 20)
        right.plot([(k + 0.5) * bin_s / 60 for k in keys],
                   [100 * cells[k][0] / cells[k][1] for k in keys], marker=".",
                   color=colors.get(v), label=v)
    for t, v, status in watch.events:
        if status in ("canary", "active") and t > 1:
            right.axvline(t / 60, color=colors.get(v, "gray"), ls=":" if status == "canary"
                          else "--", lw=1)
    right.set(xlabel="minutes (dotted: canary starts, dashed: becomes active)",
              ylabel=f"approval (%), {bin_s:.0f}-s bins", ylim=(0, 105),
              title="Approval per version over time")
    right.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--taste", choices=sorted(TASTES), default="terse")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default=".flywheel/models/base")
    parser.add_argument("--out", default="bench/out", help="where the JSON summary goes")
    parser.add_argument("--plot", default=None, help="PNG (docs/learning-<taste>.png)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--n", type=int, default=3, help="answers per request (ranked)")
    parser.add_argument("--users", type=int, default=64, help="simulated user ids")
    parser.add_argument("--min-feedback", type=int, default=48)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a Flywheel setting for `flywheel up`, e.g. CANARY__FRACTION=0.3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paced", type=int, default=0, metavar="N",
                        help="stop after every N rated answers until a cycle on them finished")
    parser.add_argument("--max-rated", type=int, default=0,
                        help="end the run at this many rated answers (0: by --minutes only)")
    args = parser.parse_args()

    taste = TASTES[args.taste]
    model_dir = Path(args.model).resolve()
    if not (model_dir / "config.json").exists():
        print(f"building the demo model into {model_dir}", flush=True)
        build_demo_model(model_dir)
    env = flywheel_env(model_dir, args.min_feedback, args.set, paced=bool(args.paced))
    name = f"learning-{taste.name}" + (f"-paced{args.paced}-u{args.users}" if args.paced else "")
    settings = {k: v for k, v in env.items() if k.startswith("FLYWHEEL_")}
    print(f"taste {taste.name}: {taste.summary}\nsettings: {settings}", flush=True)
    port, began = _free_port(), time.monotonic()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="flywheel-learning-") as tmp:
        proc = start_system(Path(tmp), env, port)
        try:
            asyncio.run(wait_ready(url, proc))
            sim, watch, milestones = asyncio.run(simulate(url, taste, args))
            policies, runs = asyncio.run(fetch_final(url))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(tmp) / "flywheel-up.log", out / f"{name}.log")
        summary = summarize(sim, policies, runs)
        print_summary(summary, taste, settings, time.monotonic() - began)
        if args.paced:
            print_paced(summary, milestones, args.paced, args.users, sim.ledger.rated)
        (out / f"{name}.json").write_text(json.dumps(
            {**summary, "taste": taste.name, "settings": settings, "events": watch.events,
             "users": args.users, "rated": sim.ledger.rated, "wall_s": time.monotonic() - began,
             "timeline": sim.timeline,
             "milestones": {"first_policy": milestones.first_policy,
                            "first_candidate": milestones.first_candidate,
                            "first_canary": milestones.first_canary,
                            "first_promotion": milestones.first_promotion,
                            "reasons": milestones.reasons}},
            indent=1, default=str))
        default_plot = (out if args.paced else ROOT / "docs") / f"{name}.png"
        image = plot(sim, watch, summary, taste, Path(args.plot or default_plot))
        print(f"plot: {image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
