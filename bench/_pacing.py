"""Paced rating for bench/learning.py (`--paced 50`): the raters stop after every 50 rated
answers until a training cycle that saw them has finished, as tests/test_up_newcomer.py does, so
what is counted is rated answers, not this machine's speed.

The cycles are queued through the API (`POST /v1/training/runs`) and waited for
(`GET /v1/training/runs/{id}`); the feedback trigger is off. Milestones are counted in rated
answers (thumbs the server accepted): the first version a cycle made (any status, as
tests/test_up_newcomer.py counts), the first candidate (one that passed the offline gate), the
first canary and the first promotion. A version's `created_at` and a canary's `started_at` are
mapped to the thumbs sent before them. No public field dates a promotion, and simulated raters
rate dozens of answers a second: it is counted as the canary's start plus the thumbs its
evidence counted (`canary/active_ratings` + `canary/canary_ratings`), at most the count when a
poll first saw it."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

BASE = "policy-0"
MILESTONE_POLL = 1.0  # seconds between looks at /v1/policies while raters rate
FEEDBACK_TRIGGER_OFF = "1000000"  # train.min_new_feedback while the bench queues the cycles


@dataclass
class RatedLedger:
    """Cumulative rated answers over wall-clock (unix) time."""

    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    @property
    def rated(self) -> int:
        return self.counts[-1] if self.counts else 0

    def add(self, k: int = 1) -> None:
        self.times.append(time.time())
        self.counts.append(self.rated + k)

    def at(self, unix: float) -> int:
        """Rated answers the server had accepted by `unix`."""
        i = bisect.bisect_right(self.times, unix)
        return self.counts[i - 1] if i else 0


@dataclass
class Milestones:
    """Rated answers at the first policy (candidate), first canary and first promotion."""

    first_policy: tuple[int, str] | None = None  # any version a cycle made, gate-rejected too
    first_candidate: tuple[int, str] | None = None  # the first that passed the offline gate
    first_canary: tuple[int, str] | None = None
    first_promotion: tuple[int, str] | None = None
    reasons: list[tuple[int, str, str]] = field(default_factory=list)  # rated, version, reason
    promotion_seen: int | None = None  # rated answers when a poll first saw the promotion
    canary_starts: dict[str, int] = field(default_factory=dict)
    _last_reason: dict[str, str] = field(default_factory=dict)

    def observe(self, policies: list[dict[str, Any]], ledger: RatedLedger) -> None:
        for p in sorted(policies, key=lambda p: p["created_at"] or 0):
            if p["id"] == BASE:
                continue
            metrics = p.get("metrics") or {}
            if self.first_policy is None:
                self.first_policy = (ledger.at(p["created_at"]), p["id"])
            gated_out = p["status"] == "rejected" and "canary/decision" not in metrics
            if self.first_candidate is None and not gated_out:
                self.first_candidate = (ledger.at(p["created_at"]), p["id"])
            if p["status"] == "canary" and p["id"] not in self.canary_starts:
                self.canary_starts[p["id"]] = ledger.at(
                    (p.get("canary") or {}).get("started_at") or time.time())
            if "canary/decision" in metrics and p["id"] not in self.canary_starts:
                self.canary_starts[p["id"]] = ledger.rated  # decided between two polls
            if self.first_canary is None and p["id"] in self.canary_starts:
                self.first_canary = (self.canary_starts[p["id"]], p["id"])
            if self.first_promotion is None and metrics.get("canary/decision") == "promoted":
                self.promotion_seen = ledger.rated
                counted = self.canary_starts[p["id"]] + round(
                    metrics.get("canary/active_ratings", 0)
                    + metrics.get("canary/canary_ratings", 0))
                self.first_promotion = (min(counted, ledger.rated), p["id"])
            reason = p.get("reason")
            if reason and self._last_reason.get(p["id"]) != _kind(reason):
                self._last_reason[p["id"]] = _kind(reason)
                self.reasons.append((ledger.rated, p["id"], reason))

    def lines(self) -> list[str]:
        def show(m: tuple[int, str] | None) -> str:
            return "not reached" if m is None else f"{m[0]} ({m[1]})"
        return [f"rated answers at the first policy (any version made): "
                f"{show(self.first_policy)}",
                f"rated answers at the first candidate (passed the gate): "
                f"{show(self.first_candidate)}",
                f"rated answers at the first canary: {show(self.first_canary)}",
                f"rated answers at the first promotion: {show(self.first_promotion)}"
                + (f", first seen by a poll at {self.promotion_seen}"
                   if self.promotion_seen is not None else "")]


def _kind(reason: str) -> str:
    """A reason without its figures, so that a canary's changing counts are one kind."""
    return "".join(c for c in reason if not (c.isdigit() or c in ".+-%"))[:80]


@dataclass
class Pacer:
    """Lets raters start a turn while the batch has room; the last one out queues a cycle."""

    batch: int
    max_rated: int
    stop: int = 0
    claimed: int = 0
    inflight: int = 0
    finished: bool = False
    cycles: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # rated, run
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)

    def __post_init__(self) -> None:
        self.stop = self.batch

    async def admit(self, answers: int) -> bool:
        """Wait until this turn fits in the batch; False once the run is over."""
        async with self.cond:
            await self.cond.wait_for(lambda: self.finished or self.claimed < self.stop)
            if self.finished:
                return False
            self.claimed += answers
            self.inflight += 1
            return True

    async def leave(self) -> None:
        async with self.cond:
            self.inflight -= 1
            self.cond.notify_all()

    async def end(self) -> None:
        async with self.cond:
            self.finished = True
            self.cond.notify_all()

    async def pace(self, client: httpx.AsyncClient, ledger: RatedLedger, milestones: Milestones,
                   deadline: float) -> None:
        """Each time a batch is rated: one cycle on it, waited for, then the next batch. If
        pacing fails, the run ends (the raters would otherwise wait for it forever)."""
        try:
            await self._pace(client, ledger, milestones, deadline)
        except BaseException as exc:
            print(f"[paced] pacing stopped: {exc!r}", flush=True)
            await self.end()
            raise

    async def _pace(self, client: httpx.AsyncClient, ledger: RatedLedger,
                    milestones: Milestones, deadline: float) -> None:
        while True:
            async with self.cond:
                await self.cond.wait_for(lambda: self.finished or (
                    self.claimed >= self.stop and self.inflight == 0))
                if self.finished:
                    return
            rated = ledger.rated
            run = await train_once(client, deadline)
            self.cycles.append((rated, run))
            milestones.observe((await client.get("/v1/policies")).json()["data"], ledger)
            print(f"[paced] {rated} rated answers: cycle {run['id']} {run['status']}"
                  f"{' -> ' + str(run['policy_id']) if run.get('policy_id') else ''}: "
                  f"{run.get('reason') or ''}", flush=True)
            async with self.cond:
                if rated >= self.max_rated or time.monotonic() >= deadline:
                    self.finished = True
                self.claimed = ledger.rated
                self.stop = self.claimed + self.batch
                self.cond.notify_all()


async def train_once(client: httpx.AsyncClient, deadline: float) -> dict[str, Any]:
    """Queue one cycle and wait for it to finish (or for the run's deadline). A poll that
    fails (the server busy swapping weights on a loaded machine) is tried again."""
    queued = await client.post("/v1/training/runs")
    queued.raise_for_status()
    run: dict[str, Any] = queued.json()
    while time.monotonic() < deadline + 600:  # a cycle begun in time is waited for
        with contextlib.suppress(httpx.TransportError):
            run = (await client.get(f"/v1/training/runs/{run['id']}")).json()
            if run["status"] not in ("queued", "running"):
                return run
        await asyncio.sleep(0.5)
    return run


async def watch_milestones(client: httpx.AsyncClient, ledger: RatedLedger,
                           milestones: Milestones, pacer: Pacer) -> None:
    while not pacer.finished:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):  # the next poll
            milestones.observe((await client.get("/v1/policies")).json()["data"], ledger)
        await asyncio.sleep(MILESTONE_POLL)


def print_paced(summary: dict[str, Any], milestones: Milestones, batch: int, users: int,
                rated: int) -> None:
    """The milestones in rated answers, approval before and after, and what waited."""
    def pct(row: dict[str, Any] | None) -> str:
        return "-" if not row or row["approval"] is None else (
            f"{row['version']} {100 * row['approval']:.1f}%")
    base = next((r for r in summary["versions"] if r["version"] == BASE), None)
    print(f"\npaced every {batch} rated answers, {users} user(s), {rated} rated answers in all")
    for line in milestones.lines():
        print(line)
    print(f"approval by the taste: start {pct(base)}, best-seen {pct(summary['best'])}, "
          f"final {pct(summary['final'])}")
    print("waits seen (rated answers, version, reason; first of each kind):")
    for at, version, reason in milestones.reasons:
        print(f"  {at:>5} {version}: {reason}")
