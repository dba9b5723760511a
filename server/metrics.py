"""Prometheus metrics of one server process (own registry, so several apps can live in one test)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from flywheel.approval import wilson_interval

Ratings = dict[str, tuple[int, int]]  # version -> (up, down)


class LiveApprovalCollector(Collector):
    """Live approval per version, read from the store's counters at scrape time (one small
    query of a table keyed by version, never a scan of the feedback)."""

    def __init__(self, ratings: Callable[[], Ratings]) -> None:
        self.ratings = ratings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            ratings = self.ratings()
        except Exception:  # a scrape during a database outage shows the other metrics
            return
        approval = GaugeMetricFamily("flywheel_policy_approval",
                                     "Thumbs up / thumbs on the answers of a version",
                                     labels=["version"])
        low = GaugeMetricFamily("flywheel_policy_approval_low",
                                "Lower bound of the 95% Wilson interval of the approval",
                                labels=["version"])
        count = GaugeMetricFamily("flywheel_policy_ratings",
                                  "Thumbs on the answers of a version", labels=["version"])
        for version, (up, down) in sorted(ratings.items()):
            n = up + down
            count.add_metric([version], n)
            interval = wilson_interval(up, n)
            if interval is not None:
                approval.add_metric([version], up / n)
                low.add_metric([version], interval[0])
        yield from (approval, low, count)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """The server's counters, gauges and histograms (names prefixed ``flywheel_``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("flywheel_requests_total", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("flywheel_request_latency_seconds",
                                 "End-to-end completion latency", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("flywheel_time_to_first_token_seconds",
                              "Time from request to first generated token", ["route"],
                              buckets=_TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("flywheel_prompt_tokens_total", "Prompt tokens processed",
                                     registry=r)
        self.generation_tokens = Counter("flywheel_generation_tokens_total",
                                         "Tokens generated", ["policy_version"], registry=r)
        self.in_flight = Gauge("flywheel_requests_in_flight", "Completion requests being served",
                               registry=r)
        self.feedback = Counter("flywheel_feedback_total", "Feedback events stored",
                                ["kind"], registry=r)
        self.policy = Gauge("flywheel_policy_version_info", "Served policy version (value 1)",
                            ["version"], registry=r)
        self.swaps = Counter("flywheel_policy_swaps_total", "Hot swaps by outcome", ["outcome"],
                             registry=r)
        self.unstored = Counter("flywheel_completions_unstored_total",
                                "Completions served while the database was unavailable",
                                registry=r)
        self.canary = Gauge("flywheel_canary_fraction",
                            "Share of new requests sent to the version on canary", ["version"],
                            registry=r)
        self._served: str | None = None
        self._canary: str | None = None

    def set_policy(self, version: str) -> None:
        if self._served is not None:
            self.policy.remove(self._served)
        self.policy.labels(version=version).set(1)
        self._served = version

    def set_canary(self, version: str | None, fraction: float) -> None:
        if self._canary is not None and self._canary != version:
            self.canary.remove(self._canary)
        if version is not None:
            self.canary.labels(version=version).set(fraction)
        self._canary = version

    def watch_live_approval(self, ratings: Callable[[], Ratings]) -> None:
        self.registry.register(LiveApprovalCollector(ratings))

    def render(self) -> bytes:
        """The text exposition (blocking: it reads the store; call it off the event loop)."""
        return generate_latest(self.registry)
