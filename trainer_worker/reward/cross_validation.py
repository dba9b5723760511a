"""Judging a first reward model by cross-validation over prompts.

A reward model is kept only when users' held-out feedback says it ranks answers their way; the
held-out prompts are a fifth of the distinct prompts, and no RM trained by the cycle ever sees
them. For a small group with a rarely-approving taste that is too little evidence for a long
time: about one held-out pair per 25-50 rated answers, so the accuracy's lower bound stays under
the floor while the feedback on the other four fifths could already tell.

An RM trained from the base model (the first, or the first after the split) has a procedure
that can be judged on all of it: the train split's prompts fall into `FOLDS` folds (by a hash
of the prompt's tokens); for each fold an RM fitted the same way on the other folds orders that
fold's pairs. Those verdicts join the held-out ones of the RM that is kept (fitted on every
fold), and the floor applies to all of them: five times the evidence at the same rated answers,
the same floor. Each judged pair is ordered by an RM that never saw its prompt.

A warm-started RM cannot be judged this way (the RM it starts from trained on every fold): it
is judged on the held-out prompts alone. Nor is a first RM with `ENOUGH_HELD_OUT_PAIRS` held-out
pairs (a crowd's): they bound its accuracy within about 7 points, and five more fits of a large
model would buy little.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from feedback_store.identities import Tally
from feedback_store.types import RewardData
from flywheel.settings import RewardConfig
from trainer_worker.reward.data import holdout_pairs
from trainer_worker.reward.train import fit_reward_model, judged_pairs, merge_verdicts

FOLDS = 5
ENOUGH_HELD_OUT_PAIRS = 200


def prompt_fold(prompt_token_ids: Sequence[int], folds: int = FOLDS) -> int:
    """The fold of a prompt: stable across cycles and processes."""
    digest = hashlib.sha256(",".join(map(str, prompt_token_ids)).encode()).digest()
    return int.from_bytes(digest[:4], "big") % folds


def folds_of(data: RewardData, folds: int = FOLDS) -> list[tuple[RewardData, RewardData]]:
    """(what the fold's RM trains on, what it judges) for each fold."""
    group_fold = [prompt_fold(g.prompt_token_ids, folds) for g in data.groups]
    thumb_fold = [prompt_fold(t.prompt_token_ids, folds) for t in data.thumbs]

    def part(k: int, held_out: bool) -> RewardData:
        return RewardData([g for g, f in zip(data.groups, group_fold, strict=True)
                           if (f == k) == held_out],
                          [t for t, f in zip(data.thumbs, thumb_fold, strict=True)
                           if (f == k) == held_out])

    return [(part(k, held_out=False), part(k, held_out=True)) for k in range(folds)]


def _judges(data: RewardData, judges: Collection[str] | None) -> RewardData:
    """The pairs that judge: rankings and thumbs (never implicit signals) of ``judges``."""
    return RewardData([g for g in data.groups if judges is None or g.identity in judges],
                      [t for t in data.thumbs if (judges is None or t.identity in judges)
                       and t.source != "implicit"])


def cross_validated_pair_count(data: RewardData, judges: Collection[str] | None = None) -> int:
    """The pairs cross-validation would judge: each fold's own (no RM is fitted to count)."""
    return sum(holdout_pairs(_judges(judged, judges)) for _, judged in folds_of(data))


def cross_validated_verdicts(base_dir: Path, data: RewardData, cfg: RewardConfig, *,
                             judges: Collection[str] | None = None, device: str = "cpu",
                             should_stop: Callable[[], bool] | None = None
                             ) -> dict[str, Tally]:
    """Per rater: the pairs of its feedback on each fold that an RM fitted from ``base_dir`` on
    the other folds judged, and how many it ordered the rater's way. Only ``judges`` (all
    raters when None) judge; everyone's feedback trains."""
    verdicts: list[dict[str, Tally]] = []
    for train, judged in folds_of(data):
        judged = _judges(judged, judges)
        if not (train.groups or train.thumbs) or holdout_pairs(judged) == 0:
            continue
        model, _, _ = fit_reward_model(base_dir, train, cfg, device=device, progress=False,
                                       should_stop=should_stop)
        verdicts.append(judged_pairs(model, judged, cfg, device))
        del model
    return merge_verdicts(*verdicts)
