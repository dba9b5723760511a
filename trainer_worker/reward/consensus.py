"""How often each rater's new feedback agrees with the reward model in service.

The RM in service stands for the consensus of the other raters: it was trained before this
feedback arrived, on data in which no identity had more than its capped share, and it is in
service only because it ranked held-out feedback better than chance. Each new event is judged
once (later cycles see it as replay, and never score it again); the tallies go to the store,
which turns them into weights (`feedback_store.identities.agreement_weight`). Before any RM is
in service, `cross_fitted_tallies` stands in for it with RMs fitted on the other raters. An RM
trained on the feedback of fewer than `MIN_CROSS_FIT_RATERS` raters stands for no consensus of
others either (`in_service_tallies`): a lone rater would be judged by a model of its own taste,
and one weak early model finding a few of its pairs inverted left it down-weighted with no one
else to judge any later model by.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from feedback_store.identities import Tally, agreement_weight, limit_identities
from feedback_store.types import (
    ANONYMOUS,
    PreferenceGroup,
    RewardData,
    RewardModelState,
    ThumbExample,
)
from flywheel.settings import RewardConfig
from trainer_worker.reward.data import rm_sequence
from trainer_worker.reward.losses import group_pairs
from trainer_worker.reward.model import RewardModel
from trainer_worker.reward.train import score_sequences, train_reward_model

if TYPE_CHECKING:
    from feedback_store import Store

# Below this many identities, the others are no consensus: the first cycle counts, not judges.
MIN_CROSS_FIT_RATERS = 4
# The identities fall into this many folds; each is judged by an RM fitted on all the others.
# Two halves left an RM with three honest raters and one hostile one in some assignments of
# names (too weak for the floor: tests/trainer_worker/test_reward_weights.py); four folds fit
# each judge on three quarters of the raters, for twice the cold start's RM fits.
FOLDS = 4


def new_event_counts(data: RewardData) -> dict[str, Tally]:
    """Events per identity among the new examples, before any RM has judged them. Implicit
    signals are not counted, nor judged anywhere here: a rater's weight rests on what it rated."""
    counts: dict[str, int] = defaultdict(int)
    for item in [*data.groups, *_explicit(data.thumbs)]:
        if item.new:
            counts[item.identity] += 1
    return {name: Tally(events=n) for name, n in counts.items()}


@torch.no_grad()
def agreement_tallies(rm_dir: Path, data: RewardData, max_length: int,
                      device: str = "cpu") -> dict[str, Tally]:
    """Per identity: new events, and of their pairs and lone thumbs how many the RM in service
    orders the rater's way (a pair: the preferred answer scores higher; a thumb: its normalised
    score is on the side of its label)."""
    model = RewardModel.from_pretrained(rm_dir, device=device)
    eos = model.eos_token_ids
    groups = [g for g in data.groups if g.new]
    thumbs = [t for t in _explicit(data.thumbs) if t.new]
    tallies = new_event_counts(data)
    scored: dict[str, int] = defaultdict(int)
    agreed: dict[str, int] = defaultdict(int)
    for group, correct, total in _group_agreement(model, groups, eos, max_length, device):
        scored[group.identity] += total
        agreed[group.identity] += correct
    for thumb, right in _thumb_agreement(model, thumbs, eos, max_length, device):
        scored[thumb.identity] += 1
        agreed[thumb.identity] += int(right)
    return {name: tally + Tally(0, scored[name], agreed[name])
            for name, tally in tallies.items()}


def in_service_tallies(store: Store, rm: RewardModelState, data: RewardData, max_length: int,
                       device: str = "cpu") -> dict[str, Tally]:
    """`agreement_tallies` against ``rm``, the RM in service; when the feedback up to its
    watermark came from fewer than `MIN_CROSS_FIT_RATERS` raters, the events are counted, not
    judged."""
    if store.rater_count(rm.watermark, MIN_CROSS_FIT_RATERS) < MIN_CROSS_FIT_RATERS:
        return new_event_counts(data)
    return agreement_tallies(Path(rm.path or ""), data, max_length, device)


def _explicit(thumbs: Sequence[ThumbExample]) -> list[ThumbExample]:
    return [t for t in thumbs if t.source == "thumbs"]


def _group_agreement(model: RewardModel, groups: Sequence[PreferenceGroup], eos: list[int],
                     max_length: int, device: str) -> list[tuple[PreferenceGroup, int, int]]:
    sequences = [rm_sequence(g.prompt_token_ids, a, eos, max_length)
                 for g in groups for a in g.answers]
    scores = score_sequences(model, sequences, device)  # (N,)
    sizes, tiers = [len(g.answers) for g in groups], [g.tiers for g in groups]
    winners, losers, pair_group = group_pairs(sizes, tiers=tiers)  # (P,) each
    right = (scores[winners] > scores[losers]).long()  # (P,)
    correct = torch.zeros(len(groups), dtype=torch.long).index_add(0, pair_group, right)
    total = torch.bincount(pair_group, minlength=len(groups))
    return list(zip(groups, correct.tolist(), total.tolist(), strict=True))


def _thumb_agreement(model: RewardModel, thumbs: Sequence[ThumbExample], eos: list[int],
                     max_length: int, device: str) -> list[tuple[ThumbExample, bool]]:
    sequences = [rm_sequence(t.prompt_token_ids, t.answer_token_ids, eos, max_length)
                 for t in thumbs]
    scores = model.normalize(score_sequences(model, sequences, device))  # (N,)
    return [(t, bool(s > 0) == t.label) for t, s in zip(thumbs, scores.tolist(), strict=True)]


def cross_fitted_tallies(base_dir: Path, data: RewardData, cfg: RewardConfig, *, share: float,
                         holdout: RewardData, floor: float, device: str = "cpu",
                         should_stop: Callable[[], bool] | None = None) -> dict[str, Tally]:
    """Before any RM is in service: each identity's new events judged by an RM trained on the
    other identities' feedback only.

    The identities are split in `FOLDS` folds (by a hash of the name); for each fold an RM is
    fitted on the other folds (equal shares: a consensus) and judges it. No rater is judged by a
    model it trained, so a flood of inverted ratings meets the consensus of the others from the very
    first cycle, not only once the first RM, trained with the flood at its full capped share,
    is in service. A fold's judge judges only if it meets the bar of an RM in service: the lower
    95% bound of its accuracy on `holdout` at least `floor` (a weak one would down-weight honest
    raters at random). A judge may miss the floor because a hostile rater of another fold pulled
    it; when another fold's judge caught someone, the folds left unjudged are fitted again
    without the raters caught so far, until a round catches no one new. Anonymous feedback
    trains every judge and is never judged (it has no one to weigh). With fewer than
    `MIN_CROSS_FIT_RATERS` identities there is no consensus of others to speak of: the events
    are counted, not judged, as before.
    """
    names = sorted({item.identity for item in [*data.groups, *data.thumbs]} - {ANONYMOUS})
    tallies = new_event_counts(data)
    if len(names) < MIN_CROSS_FIT_RATERS:
        return tallies
    fold = {name: hashlib.sha256(name.encode()).digest()[0] % FOLDS for name in names}
    unjudged, caught = list(range(FOLDS)), set[str]()
    while unjudged:
        too_weak = []
        for judged in unjudged:
            verdicts = _judge_fold(base_dir, data, [n for n in names if fold[n] == judged],
                                   caught, cfg, share=share, holdout=holdout, floor=floor,
                                   device=device, should_stop=should_stop)
            if verdicts is None:
                too_weak.append(judged)
                continue
            for name, tally in verdicts.items():
                tallies[name] = tallies[name] + Tally(0, tally.scored, tally.agreed)
        newly = {name for name, t in tallies.items()
                 if agreement_weight(t.scored, t.agreed, 0.0) < 1.0} - caught
        if not newly:
            break
        unjudged, caught = too_weak, caught | newly
    return tallies


def _judge_fold(base_dir: Path, data: RewardData, judged: list[str], caught: set[str],
                cfg: RewardConfig, *, share: float, holdout: RewardData, floor: float,
                device: str, should_stop: Callable[[], bool] | None) -> dict[str, Tally] | None:
    """The `judged` identities' events judged by an RM fitted on everyone else's but the
    `caught` raters': their tallies ({} with nothing to judge or no one to learn from), or None
    when that RM misses the floor."""
    judged_set = set(judged)
    left_out = judged_set | caught

    def trains(item: PreferenceGroup | ThumbExample) -> bool:
        return item.identity == ANONYMOUS or item.identity not in left_out

    def own(item: PreferenceGroup | ThumbExample) -> bool:
        return item.identity in judged_set

    others = RewardData([g for g in data.groups if trains(g)],
                        [t for t in data.thumbs if trains(t)])
    mine = RewardData([g for g in data.groups if own(g)], [t for t in data.thumbs if own(t)])
    if not (others.groups or others.thumbs) or not (mine.groups or mine.thumbs):
        return {}
    # Equal shares: the consensus of the others, where no rater outweighs another.
    others, _ = limit_identities(others, share, {}, seed=cfg.seed, equal=True)
    with tempfile.TemporaryDirectory(prefix="flywheel-cross-fit-") as tmp:
        metrics = train_reward_model(base_dir, others, cfg, Path(tmp), holdout=holdout,
                                     device=device, progress=False, should_stop=should_stop)
        if not metrics["reward/accuracy_low"] >= floor:  # (NaN-safe) too weak to judge
            return None
        return agreement_tallies(Path(tmp), mine, cfg.max_length, device)
