"""Lanes: the groups (``groups.py``) whose models decode together, in one batch and one forward.

A lane holds one batch for the rows of its member groups (a ``SlotBatch``, whose keys and values
stay in place, for a model that ``slots_fit``; else a ``PaddedBatch``), group after group in member
order (each group's ``seqs`` in row order), and runs it through the one group's model when only
one has rows, else through a routed model over the members' models (``routing.py``). Groups
whose models share an architecture share a lane, so a canary, or a version draining after a
swap, costs no forward pass of its own; a model that cannot be routed with the others gets a
lane of its own and its own forward, as every group had before lanes. Whether a new model routes
with a lane's is probed where the model was loaded (``Lanes.probe``), not on the decode thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Iterator
from typing import Any

from server.engines.batch import PaddedBatch
from server.engines.groups import Group
from server.engines.routing import Probed, Routing, RowRuns, fusion_key, route, routed
from server.engines.sampling import RowSampler
from server.engines.sequence import Sequence
from server.engines.slot_batch import SlotBatch, slots_fit

logger = logging.getLogger(__name__)


class Lane:
    """Member groups, their rows' batch and sampler, and the routed model over their models."""

    def __init__(self, key: Hashable | None, group: Group) -> None:
        self.key = key  # None: this lane admits no other group
        self.members: list[Group] = [group]
        self.batch: SlotBatch | PaddedBatch | None = None
        self._slots: bool | None = None  # whether the models decode in a ``SlotBatch``
        self.sampler: RowSampler | None = None  # None: rebuild before the next step
        self._routing: Routing | None = None  # a routed model and its runs, over ``_over``
        self._over: list[Group] = []  # the members when it was built: these, or more
        self._changes = 0  # joins and leaves so far
        self._rebuilt: tuple[int, Routing | None] | None = None  # from ``leave``'s thread
        self._rebuilt_lock = threading.Lock()

    def seqs(self) -> list[Sequence]:
        """The batch's sequences in row order."""
        return [s for g in self.members for s in g.seqs]

    def model_for(self, sizes: list[int]) -> Any:
        """The model for a forward pass whose rows are ``sizes[i]`` rows of member ``i``, in
        member order: the member's own model when only one has rows. After a member left, the
        routed model over the members before (the one that left given no rows) serves until
        the one over those left is built off this thread (``leave``)."""
        if self._rebuilt is not None:  # (first: the old routed model's weights go with it)
            with self._rebuilt_lock:
                rebuilt, self._rebuilt = self._rebuilt, None
            if rebuilt is not None and rebuilt[0] == self._changes:  # over the members now
                self._over, self._routing = list(self.members), rebuilt[1]
        busy = [g for g, n in zip(self.members, sizes, strict=True) if n]
        if len(busy) == 1:
            return busy[0].model
        if self._routing is None:  # none probed, or the members left do not route alike
            runs = RowRuns(len(self.members), self.members[0].model.device)
            self._over, self._routing = list(self.members), (runs, routed(
                [g.model for g in self.members], runs))
        runs, model = self._routing
        if len(self._over) != len(self.members):  # a member left: it gets no rows
            by_group = {id(g): n for g, n in zip(self.members, sizes, strict=True)}
            sizes = [by_group.get(id(g), 0) for g in self._over]
        runs.set(sizes)
        return model

    def join(self, group: Group, routing: Routing) -> None:
        """Add ``group``, whose model ``routing`` routes with the members' (``routing.route``)."""
        self.members.append(group)
        self._changes += 1
        self._over, self._routing = list(self.members), routing

    def leave(self, group: Group) -> None:
        """Drop ``group`` (idle: none of the batch's rows is its; maybe freed, without a model)
        from the members. The routed model holds its modules: with one member left it goes at
        once; with more it serves until the routed model over those left, built on a thread of
        its own (a pass over the weights, ``routing.route``), takes its place."""
        self.members = [g for g in self.members if g is not group]  # by identity, not fields
        self._changes += 1
        if len(self.members) < 2 or self._routing is None:
            self._over, self._routing = [], None
            return
        changes, models = self._changes, [g.model for g in self.members]

        def rebuild() -> None:
            routing = route(models)
            with self._rebuilt_lock:  # a later leave's rebuild may have finished first
                if self._rebuilt is None or self._rebuilt[0] < changes:
                    self._rebuilt = (changes, routing)

        threading.Thread(target=rebuild, name="flywheel-route", daemon=True).start()

    def merge(self, batch: PaddedBatch, new: list[list[Sequence]]) -> None:
        """Add ``batch``, the rows of ``new[i]`` for member ``i`` in member order, keeping each
        member's rows together (``_runs_in_place``: the fewest rows move)."""
        if self.batch is None:
            if self._slots is None:  # one probe per lane: its models share an architecture
                self._slots = slots_fit(self.members[0].model)
                if not self._slots:
                    logger.info("policy %s decodes with transformers' DynamicCache",
                                self.members[0].version)
            self.batch = SlotBatch.adopt(batch) if self._slots else batch
            for group, added in zip(self.members, new, strict=True):
                group.seqs.extend(added)
        else:
            old = sum(len(g.seqs) for g in self.members)
            sources, joining, row = [], old, 0
            for group, added in zip(self.members, new, strict=True):
                sources.append([*range(row, row + len(group.seqs)),
                                *range(joining, joining + len(added))])
                row, joining = row + len(group.seqs), joining + len(added)
            seqs = self.seqs() + [s for added in new for s in added]
            placed = _runs_in_place(sources, old)
            self.batch.merge(batch, [src for rows in placed for src in rows])
            self._reorder(placed, seqs)
        self.sampler = None

    def drop(self, keep: list[int]) -> None:
        """Keep only the batch's rows ``keep`` (ascending), and those groups' sequences."""
        kept = set(keep)
        if not keep:
            for group in self.members:
                group.seqs = []
            self.batch, self.sampler = None, None
            return
        assert self.batch is not None
        sources, row = [], 0
        for group in self.members:
            sources.append([r for r in range(row, row + len(group.seqs)) if r in kept])
            row += len(group.seqs)
        seqs, placed = self.seqs(), _runs_in_place(sources, row)
        self.batch.select([src for rows in placed for src in rows])
        self._reorder(placed, seqs)
        self.sampler = None

    def _reorder(self, placed: list[list[int]], seqs: list[Sequence]) -> None:
        """Each member's sequences in its new rows' order (``placed``: their sources, indices
        into ``seqs``), once the batch holds them so."""
        for group, rows in zip(self.members, placed, strict=True):
            group.seqs = [seqs[src] for src in rows]

    def reset(self) -> None:
        """After a failure: no rows, every member's sequences already failed and cleared."""
        self.batch, self.sampler = None, None


class Lanes:
    """The lanes of the groups that have joined one, in the order they were opened."""

    def __init__(self) -> None:
        self._lanes: list[Lane] = []
        self._of: dict[int, Lane] = {}

    def __iter__(self) -> Iterator[Lane]:
        return iter(list(self._lanes))

    def probe(self, model: Any, groups: list[Group]) -> Probed:
        """``model`` routed beside each lane of its architecture, and beside each of ``groups``
        of that architecture not yet in a lane (any thread: where the model was loaded, so that
        placing its group costs the decode thread no probe; ``routing.route``)."""
        key = fusion_key(model)
        members: list[list[Any]] = []
        if key is None:
            return Probed(model, key, members)
        for lane in list(self._lanes):  # the decode thread may change them meanwhile: copies
            models = [getattr(g, "model", None) for g in list(lane.members)]
            if lane.key == key and None not in models:
                members.append(models)
        for group in groups:
            other = getattr(group, "model", None)  # None: freed meanwhile
            if other is not None and id(group) not in self._of and fusion_key(other) == key:
                members.append([other])
        return Probed(model, key, members)

    def place(self, group: Group) -> Lane:
        """``group``'s lane: the one it is in, else the first that routes its model alike, else
        a new one (on the decode thread, when the group first has rows to prefill)."""
        lane = self._of.get(id(group))
        if lane is not None:
            return lane
        probed, group.probed = group.probed, None
        key = probed.key if probed is not None else fusion_key(group.model)
        lane = None
        for candidate in self._lanes if key is not None else ():
            if candidate.key != key:
                continue
            models = [g.model for g in candidate.members] + [group.model]
            routing = probed.route(models) if probed is not None else route(models)
            if routing is not None:
                lane = candidate
                lane.join(group, routing)
                break
        if lane is None:
            lane = Lane(key, group)
            self._lanes.append(lane)
            if key is None or len(self._lanes) > 1:
                logger.info("policy %s decodes in a forward pass of its own", group.version)
        self._of[id(group)] = lane
        return lane

    def prune(self, alive: list[Group]) -> None:
        """Forget groups that were freed (``Groups.retire``), lanes left without members, and
        the probes of groups not yet placed beside freed models (``Probed.keep``): those are
        probed again beside the lanes as they are now, off this thread."""
        ids = {id(g) for g in alive}
        models = [g.model for g in alive]
        for group in alive:
            if group.probed is not None:
                group.probed.keep(models)
        left = False
        for lane in self:
            for group in list(lane.members):
                if id(group) not in ids:
                    lane.leave(group)
                    del self._of[id(group)]
                    left = True
            if not lane.members:
                self._lanes.remove(lane)
        if left:
            for group in alive:
                if group.probed is not None and id(group) not in self._of:
                    self._probe_again(group, [g for g in alive if g is not group])

    def _probe_again(self, group: Group, others: list[Group]) -> None:
        """Probe ``group`` (not yet placed) beside the lanes and ``others`` on a thread of its
        own; its new probes replace the old unless it was placed meanwhile."""

        def probe() -> None:
            model = getattr(group, "model", None)  # None: freed meanwhile
            if model is not None:
                probed = self.probe(model, others)
                if group.probed is not None:
                    group.probed = probed

        threading.Thread(target=probe, name="flywheel-route", daemon=True).start()

    def clear(self) -> None:
        self._lanes, self._of = [], {}


def _runs_in_place(sources: list[list[int]], old: int) -> list[list[int]]:
    """The new batch's rows as contiguous runs, one per member in member order, member ``i``'s
    holding the rows ``sources[i]`` (old rows below ``old``, joining ones from there): each
    member's run in new-row order. An old row already inside its member's new run stays where
    it is, and the others fill the run's free places, so a join or a leave moves about as many
    rows as joined or left, not every row after them (each move copies a row's keys and values
    over every layer: a 28M model's 5 MB at 150 columns)."""
    placed: list[list[int]] = []
    start = 0
    for rows in sources:
        stop = start + len(rows)
        run: list[int | None] = [None] * len(rows)
        rest = []
        for src in rows:
            if start <= src < min(stop, old):
                run[src - start] = src
            else:
                rest.append(src)
        free = (place for place, src in enumerate(run) if src is None)
        for src, place in zip(rest, list(free), strict=True):
            run[place] = src
        placed.append([src for src in run if src is not None])
        start = stop
    return placed
