"""How often a first reward model is kept, judged on held-out pairs alone or also by
cross-validation over prompts: with a taste to learn (the rate it should be kept) and with
raters who have none (the rate it must not be).

    python bench/first_reward_model.py --runs 20

Simulated feedback on the tiny demo model's tokens, with no server: prompts and answers are
random token strings, each answer opening with one of 20 "openers"; a rater's taste likes an
answer when it opens with one of two of them (one answer in ten, like a rarely-approving
taste), and follows it with probability `--agreement`; a rater with no taste thumbs and ranks
at random. Each request has three
answers, all thumbed and ranked (ties by the taste form one tier). A fifth of the prompts is
held out, as in the store (`is_holdout_hash`). Per run, the first RM is judged both ways, with
the cycle's floor and minimum pair count:

- held-out only: its accuracy on the held-out pairs (what the cycle did before);
- cross-validated: those and the pairs of the other prompts, each ordered by an RM fitted on
  the other folds (`trainer_worker/reward/cross_validation.py`).

Printed per (raters, rated answers, taste): the share of runs whose RM was kept each way (with
a taste: power; without: false keeps), and the median pairs each judgement had.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import tempfile
import time
from pathlib import Path

from feedback_store.training_data import is_holdout_hash
from feedback_store.types import PreferenceGroup, RewardData, ThumbExample
from flywheel.demo_model import build_demo_model
from flywheel.settings import RewardConfig, TrainSettings
from trainer_worker.reward.cross_validation import (
    cross_validated_pair_count,
    cross_validated_verdicts,
)
from trainer_worker.reward.data import holdout_pairs
from trainer_worker.reward.train import (
    fit_reward_model,
    judged_accuracy,
    judged_pairs,
    left_out_raters,
    merge_verdicts,
)

VOCAB = range(8, 500)  # clear of the special tokens
OPENERS = range(100, 120)
LIKED = frozenset(range(100, 102))  # one answer in ten opens with one


def _answer(rng: random.Random) -> list[int]:
    return [rng.choice(OPENERS), *(rng.choice(VOCAB) for _ in range(7))]


def simulate(raters: int, rated: int, taste: bool, agreement: float, seed: int
             ) -> tuple[RewardData, RewardData]:
    """(train split, held-out split) of `rated` rated answers from `raters` raters."""
    rng = random.Random(seed)
    split: dict[bool, RewardData] = {True: RewardData(), False: RewardData()}
    for request in range(rated // 3):
        rater = f"user:r{request % raters}"
        prompt = [rng.choice(VOCAB) for _ in range(6)]
        text = f"{seed}-{request}-{prompt}"
        data = split[is_holdout_hash(hashlib.sha256(text.encode()).hexdigest())]
        answers = [_answer(rng) for _ in range(3)]
        if taste:
            liked = [(a[0] in LIKED) == (rng.random() < agreement) for a in answers]
        else:
            liked = [rng.random() < 0.5 for _ in answers]
        data.thumbs.extend(ThumbExample(prompt, a, up, identity=rater)
                           for a, up in zip(answers, liked, strict=True))
        if any(liked) and not all(liked):
            order = sorted(range(3), key=lambda i: not liked[i])
            data.groups.append(PreferenceGroup(
                prompt, [answers[i] for i in order], "ranking",
                tiers=[0 if liked[i] else 1 for i in order], identity=rater))
    return split[False], split[True]


def judge(model_dir: Path, train: RewardData, holdout: RewardData, cfg: RewardConfig,
          floor: float, need: int) -> dict[str, tuple[bool, int]]:
    """Whether each judgement keeps the first RM, and on how many pairs."""
    model, _, _ = fit_reward_model(model_dir, train, cfg, progress=False)
    held = judged_pairs(model, holdout, cfg, "cpu")
    folded = cross_validated_verdicts(model_dir, train, cfg)
    verdicts: dict[str, tuple[bool, int]] = {}
    for name, parts in (("held-out", held), ("cross-validated", merge_verdicts(held, folded))):
        left_out = left_out_raters(parts)
        metrics = judged_accuracy(parts, left_out)
        pairs = int(metrics["reward/judged_pairs"])
        verdicts[name] = (pairs >= need and metrics["reward/accuracy_low"] >= floor, pairs)
    # The count the cycle checks before fitting anything agrees with what was judged.
    assert verdicts["cross-validated"][1] <= holdout_pairs(holdout) + cross_validated_pair_count(
        train)
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--raters", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--rated", type=int, nargs="+", default=[150, 300])
    parser.add_argument("--agreement", type=float, default=0.9)
    parser.add_argument("--tastes", nargs="+", choices=["yes", "none"], default=["yes", "none"])
    args = parser.parse_args()
    train_settings = TrainSettings()
    floor, need = train_settings.reward_accuracy_floor, train_settings.min_holdout_pairs
    cfg = RewardConfig(lr=1e-3, epochs=3)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny"
        build_demo_model(model_dir, preset="tiny", seed=0, progress=False)
        print(f"floor {floor:.0%}, at least {need} pairs; {args.runs} runs per row; taste "
              f"followed {args.agreement:.0%} of the time")
        print("| raters | rated answers | taste | kept, held-out only | kept, cross-validated |"
              " pairs (median), held-out / cross-validated |")
        print("|---|---|---|---|---|---|")
        for raters in args.raters:
            for rated in args.rated:
                for taste in (name == "yes" for name in args.tastes):
                    started = time.monotonic()
                    kept = {"held-out": 0, "cross-validated": 0}
                    pairs: dict[str, list[int]] = {"held-out": [], "cross-validated": []}
                    for run in range(args.runs):
                        train, holdout = simulate(raters, rated, taste, args.agreement,
                                                  seed=1000 * raters + rated + run)
                        for name, (keep, n) in judge(model_dir, train, holdout, cfg, floor,
                                                     need).items():
                            kept[name] += keep
                            pairs[name].append(n)
                    print(f"| {raters} | {rated} | {'yes' if taste else 'none'} | "
                          f"{kept['held-out']}/{args.runs} | "
                          f"{kept['cross-validated']}/{args.runs} | "
                          f"{statistics.median(pairs['held-out']):.0f} / "
                          f"{statistics.median(pairs['cross-validated']):.0f} |"
                          f"  ({time.monotonic() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
