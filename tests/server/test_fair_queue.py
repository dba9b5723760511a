"""The scheduler's queue by key (round robin) and a key's share of the batch, without a model."""

from __future__ import annotations

from dataclasses import dataclass

from server.engines.fair_queue import RECENT_S, BatchShare, FairQueue


@dataclass
class Req:
    tenant: str
    name: str
    cancelled: bool = False
    submitted_step: int = 0


def _drain(queue: FairQueue[Req]) -> list[str]:
    order = []
    while (request := queue.peek_next(lambda r: True)) is not None:
        queue.take(request)
        order.append(request.name)
    return order


def test_keys_take_turns_and_a_newcomer_goes_first() -> None:
    queue: FairQueue[Req] = FairQueue()
    for i in range(4):
        queue.append(Req("a", f"a{i}"))
    first = queue.peek_next(lambda r: True)
    assert first is not None and first.name == "a0"
    queue.take(first)
    for name in ("b0", "b1"):
        queue.append(Req("b", name))
    queue.append(Req("c", "c0"))
    assert len(queue) == 6
    # b and c were never served: they go before a's second request, then every key in turn.
    assert _drain(queue) == ["b0", "c0", "a1", "b1", "a2", "a3"]
    assert not queue


def test_without_fairness_the_queue_is_one_fifo() -> None:
    queue: FairQueue[Req] = FairQueue(fair=False)
    names = ["a0", "a1", "b0", "a2", "c0"]
    for name in names:
        queue.append(Req(name[0], name))
    assert _drain(queue) == names


def test_a_key_over_its_share_is_passed_over_and_cancelled_heads_dropped() -> None:
    queue: FairQueue[Req] = FairQueue()
    queue.append(Req("a", "a0", submitted_step=3))
    queue.append(Req("a", "a1", submitted_step=4))
    queue.append(Req("b", "b0", cancelled=True, submitted_step=5))
    queue.append(Req("b", "b1", submitted_step=6))
    assert queue.oldest_step() == 3
    chosen = queue.peek_next(lambda r: r.tenant != "a")
    assert chosen is not None and chosen.name == "b1"
    queue.take(chosen)
    assert queue.keys() == ["a"]
    assert len(queue) == 2
    queue.append(Req("c", "c0", cancelled=True))
    queue.drop_cancelled()
    assert [r.name for r in queue.drain()] == ["a0", "a1"] and not queue


def test_batch_share_holds_only_while_another_key_is_active() -> None:
    now = [0.0]
    share = BatchShare(32, 0.75, clock=lambda: now[0])
    assert share.limit({"a"}) == 32  # alone: the whole batch
    assert share.limit({"a", "b"}) == 24
    share.saw("b")
    now[0] = RECENT_S - 1
    assert share.limit({"a"}) == 24  # b asked recently: its room stays free
    now[0] = RECENT_S + 1
    assert share.limit({"a"}) == 32
    assert BatchShare.fits(0, 40, 24)  # a key holding nothing may start a wide request
    assert BatchShare.fits(16, 8, 24) and not BatchShare.fits(17, 8, 24)
