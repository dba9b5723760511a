"""The model groups the decode thread serves: the active policy, an optional canary, draining ones.

A group is one model with its policy version, its running sequences and its joining requests
(their batch is its lane's, ``lanes.py``, shared with the groups of the same architecture). Changes
of weights (a new active version, a new canary, a promotion, the end of a canary) are queued from
the event loop as ``Change``s and applied by the decode thread between steps, so a step never
sees a half-applied change. A group that loses its role admits nothing more and is freed once its
last sequence finishes: in-flight requests end on the weights they started with.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from server.engines.base import SwapError
from server.engines.request import Request
from server.engines.routing import Probed
from server.engines.sequence import Sequence

logger = logging.getLogger(__name__)

ChangeKind = Literal["activate", "canary", "promote", "end_canary"]


@dataclass
class Group:
    model: Any
    version: str
    seqs: list[Sequence] = field(default_factory=list)  # in the order of their rows in the lane
    joining: list[Request] = field(default_factory=list)
    probed: Probed | None = None  # its model's lane probes, until it is placed in a lane

    def requests(self) -> list[Request]:
        unique = {id(s.request): s.request for s in self.seqs}
        unique.update((id(r), r) for r in self.joining)
        return list(unique.values())

    @property
    def idle(self) -> bool:
        return not self.seqs and not self.joining


@dataclass
class Change:
    """A change of the served weights; ``done`` resolves once the decode thread applied it."""

    kind: ChangeKind
    model: Any = None
    version: str = ""
    probed: Probed | None = None  # ``model`` probed against the lanes where it was loaded
    done: Future[None] = field(default_factory=Future)


class Groups:
    """Which group is active, which (if any) is the canary, and which are draining."""

    def __init__(self, model: Any, version: str) -> None:
        self.active = Group(model, version)
        self.canary: Group | None = None
        self.all: list[Group] = [self.active]  # in load order; draining ones included

    def for_request(self, request: Request) -> Group:
        """The group a request is admitted to: its arm's, the active one without a canary."""
        if request.canary and self.canary is not None:
            return self.canary
        return self.active

    def apply(self, change: Change) -> None:
        """Apply ``change`` (on the decode thread, between steps) and resolve its future."""
        if change.kind == "activate":
            self.active = self._add(change)
        elif change.kind == "canary":
            self.canary = self._add(change)  # the old canary drains
        elif change.kind == "promote":
            if self.canary is None:
                change.done.set_exception(SwapError("no canary is loaded to promote"))
                return
            self.active, self.canary = self.canary, None  # the old active drains
        else:
            self.canary = None  # drains: its requests finish on it
        change.done.set_result(None)

    def _add(self, change: Change) -> Group:
        group = Group(change.model, change.version, probed=change.probed)
        self.all.append(group)
        return group

    def retire(self) -> None:
        """Free every group that has lost its role and has nothing left to decode."""
        for group in list(self.all):
            if group is self.active or group is self.canary or not group.idle:
                continue
            self.all.remove(group)
            logger.info("policy %s drained; its weights released", group.version)
            del group.model
            group.probed = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def versions(self) -> list[str]:
        return [g.version for g in self.all]

    def requests_by_version(self) -> dict[str, int]:
        """Running requests per loaded version (0 for a loaded version with none)."""
        counts: dict[str, int] = {}
        for group in self.all:
            counts[group.version] = counts.get(group.version, 0) + len(group.requests())
        return counts
