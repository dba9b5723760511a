"""Train the reward model on ranked groups and lone thumbs, then write it to a directory."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from feedback_store.identities import Tally
from flywheel.approval import wilson_interval
from flywheel.hf_progress import tqdm, transformers_bars
from flywheel.settings import RewardConfig
from trainer_worker.reward.data import (
    Example,
    RewardDataLike,
    group_example,
    pad_right,
    preference_pairs,
    thumb_example,
    thumb_pair_example,
    thumb_pairs,
)
from trainer_worker.reward.losses import (
    bradley_terry_loss,
    pairwise_accuracy,
    pointwise_logistic_loss,
)
from trainer_worker.reward.model import RewardModel, is_reward_dir
from trainer_worker.stopping import check_stop


def train_reward_model(
    init_dir: Path,
    data: RewardDataLike,
    cfg: RewardConfig,
    out_dir: Path,
    *,
    holdout: RewardDataLike | None = None,
    cross_validated: Mapping[str, Tally] | None = None,
    device: str = "cpu",
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Fit the RM on ``data`` (fresh head on a base model, or continue a previous RM) and save it.

    ``reward/accuracy`` is the pairwise accuracy on every pair of ``holdout`` (feedback on prompts
    the RM never trains on: its groups, and one rater's lone up and down thumbs paired across
    prompts), with its Wilson 95% interval ``reward/accuracy_low`` / ``_high``. With
    ``cross_validated`` (per rater, the pairs RMs fitted the same way on other prompts ordered,
    `trainer_worker.reward.cross_validation`) the accuracy is over both sets of pairs, and
    ``reward/cross_validated_pairs`` counts the second.
    Without ``holdout`` it is the training accuracy and ``reward/holdout_pairs`` is 0: a number to
    watch a fit, not evidence. Raises ``TrainingInterrupted`` (writing nothing) when
    ``should_stop()`` turns true.
    """
    model, train_loss, train_metrics = fit_reward_model(init_dir, data, cfg, device=device,
                                                        progress=progress,
                                                        should_stop=should_stop)
    eos, max_len = model.eos_token_ids, cfg.max_length
    # Held-out accuracy: every pair of the held-out feedback of the raters who judge (all but a
    # minority the new RM finds inverted), with its interval.
    if holdout is not None:
        pairs = _holdout_pairs(holdout, eos, max_len)
        verdicts = merge_verdicts(rater_verdicts(model, pairs, device), cross_validated or {})
        left_out = left_out_raters(verdicts)
        examples = [example for rater, example in pairs if rater not in left_out]
        paired = {id(t) for pair in thumb_pairs(holdout.thumbs) for t in pair}
        examples += [thumb_example(t, eos, max_len) for t in holdout.thumbs
                     if t.identity not in left_out and id(t) not in paired]
        metrics = _evaluate(model, examples, device)
        if cross_validated is not None:
            metrics |= judged_accuracy(verdicts, left_out)
            metrics["reward/cross_validated_pairs"] = float(sum(
                tally.scored for rater, tally in cross_validated.items()
                if rater not in left_out))
        metrics["reward/holdout_groups"] = float(len(holdout.groups))
        metrics["reward/holdout_left_out_raters"] = float(len(left_out))
    else:
        metrics = {**train_metrics, "reward/holdout_pairs": 0.0}
        metrics.pop("reward/accuracy_low"), metrics.pop("reward/accuracy_high")
    check_stop(should_stop)
    with transformers_bars(progress):
        model.save_pretrained(Path(out_dir))
    metrics.update({
        "reward/train_loss": train_loss,
        "reward/train_accuracy": train_metrics["reward/accuracy"],
        "reward/pairs": float(preference_pairs(data.groups)),
        "reward/groups": float(len(data.groups)),
        "reward/thumbs": float(sum(t.source == "thumbs" for t in data.thumbs)),
        "reward/score_mean": model.score_mean,
        "reward/score_std": model.score_std,
    })
    return metrics


def fit_reward_model(init_dir: Path, data: RewardDataLike, cfg: RewardConfig, *,
                     device: str = "cpu", progress: bool = True,
                     should_stop: Callable[[], bool] | None = None
                     ) -> tuple[RewardModel, float, dict[str, float]]:
    """The fitted RM in memory, normalised on its training answers; its last epoch's mean loss
    and its training accuracy."""
    if not data.groups and not data.thumbs:
        raise ValueError("no reward data: need at least one preference group or thumb")
    # 1. Model: continue the previous reward model, or put a fresh head on the base policy.
    with transformers_bars(progress):
        if is_reward_dir(Path(init_dir)):
            model = RewardModel.from_pretrained(init_dir, device=device)
        else:
            model = RewardModel.from_base(init_dir, device=device, seed=cfg.seed)
    eos, max_len = model.eos_token_ids, cfg.max_length
    train = [group_example(g, eos, max_len) for g in data.groups]
    train += [thumb_example(t, eos, max_len) for t in data.thumbs]
    # 2. Epochs of shuffled minibatches of groups and thumbs.
    train_loss = _fit(model, train, cfg, device, progress, should_stop)
    # 3. Normalisation statistics of the scores on the training answers; training accuracy.
    train_metrics = _evaluate(model, train, device)
    model.score_mean, model.score_std = _score_stats(model, train, device)
    return model, train_loss, train_metrics


def _fit(model: RewardModel, train: list[Example], cfg: RewardConfig, device: str,
         progress: bool, should_stop: Callable[[], bool] | None) -> float:
    """Optimise the batch loss for ``cfg.epochs``; returns the mean loss of the last epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    n_batches = -(-len(train) // cfg.batch_size)
    bar = tqdm(total=cfg.epochs * n_batches, desc="reward", disable=not progress, leave=False)
    epoch_losses: list[float] = []
    for _ in range(cfg.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        epoch_losses = []
        for start in range(0, len(order), cfg.batch_size):
            check_stop(should_stop)
            batch = [train[i] for i in order[start : start + cfg.batch_size]]
            loss = _batch_loss(model, batch, cfg.pointwise_weight, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            epoch_losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return sum(epoch_losses) / max(1, len(epoch_losses))


def _batch_loss(model: RewardModel, batch: Sequence[Example], pointwise_weight: float,
                device: str) -> Tensor:
    """Bradley-Terry over the batch's groups plus weighted logistic loss over its thumbs."""
    groups = [ex for ex in batch if ex.label is None]
    thumbs = [ex for ex in batch if ex.label is not None]
    sequences = [s for ex in groups for s in ex.sequences] + [ex.sequences[0] for ex in thumbs]
    ids, mask = pad_right(sequences, device=device)  # (N, T)
    scores = model(ids, mask)  # (N,)
    n_group_answers = len(sequences) - len(thumbs)
    labels = torch.tensor([ex.label for ex in thumbs], device=scores.device)  # (N_thumbs,)
    group_weights = torch.tensor([ex.weight for ex in groups], device=scores.device)  # (G,)
    thumb_weights = torch.tensor([ex.weight for ex in thumbs], device=scores.device)  # (N_thumbs,)
    loss = bradley_terry_loss(scores[:n_group_answers], [len(ex.sequences) for ex in groups],
                              [ex.tiers for ex in groups], group_weights)
    if thumbs:
        loss = loss + pointwise_weight * pointwise_logistic_loss(
            scores[n_group_answers:], labels, thumb_weights)
    return loss


@torch.no_grad()
def score_sequences(model: RewardModel, sequences: Sequence[Sequence[int]], device: str,
                    batch_size: int = 32) -> Tensor:
    """Raw scores of many sequences, in chunks: (N,)."""
    chunks = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad_right(sequences[start : start + batch_size], device=device)
        chunks.append(model(ids, mask).float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0)


def _score_stats(model: RewardModel, examples: list[Example], device: str) -> tuple[float, float]:
    scores = score_sequences(model, [s for ex in examples for s in ex.sequences], device)
    if scores.numel() < 2:
        return 0.0, 1.0
    std = scores.std().item()
    return scores.mean().item(), std if std > 1e-6 else 1.0


def _holdout_pairs(holdout: RewardDataLike, eos: Sequence[int], max_len: int
                   ) -> list[tuple[str, Example]]:
    """Every held-out pair with its rater: the groups, and lone thumbs paired across prompts."""
    pairs = [(g.identity, group_example(g, eos, max_len)) for g in holdout.groups]
    pairs += [(up.identity, thumb_pair_example(up, down, eos, max_len))
              for up, down in thumb_pairs(holdout.thumbs)]
    return pairs


def judged_pairs(model: RewardModel, data: RewardDataLike, cfg: RewardConfig, device: str
                 ) -> dict[str, Tally]:
    """Per rater: the pairs of ``data`` (groups, and lone thumbs paired across prompts) the RM
    judged (``scored``) and ordered the rater's way (``agreed``)."""
    return rater_verdicts(model, _holdout_pairs(data, model.eos_token_ids, cfg.max_length),
                          device)


def rater_verdicts(model: RewardModel, pairs: list[tuple[str, Example]], device: str
                   ) -> dict[str, Tally]:
    """Per rater, its pairs the RM judged and of those how many it ordered the rater's way."""
    scores = score_sequences(model, [s for _, ex in pairs for s in ex.sequences], device)
    verdicts: dict[str, Tally] = {}
    start = 0
    for rater, example in pairs:
        size = len(example.sequences)
        accuracy, n = pairwise_accuracy(scores[start:start + size], [size], [example.tiers])
        start += size
        verdicts[rater] = verdicts.get(rater, Tally()) + Tally(0, n, round(accuracy * n))
    return verdicts


def merge_verdicts(*parts: Mapping[str, Tally]) -> dict[str, Tally]:
    merged: dict[str, Tally] = {}
    for part in parts:
        for rater, tally in part.items():
            merged[rater] = merged.get(rater, Tally()) + tally
    return merged


def left_out_raters(verdicts: Mapping[str, Tally]) -> set[str]:
    """Raters whose held-out pairs do not judge the RM.

    A majority rule, so that held-out judging cannot be held hostage by the raters it judges:
    raters whose held-out pairs the RM orders significantly worse than chance (the upper end of
    the Wilson 95% interval below 0.5: they rate against the taste the RM learned) are left out
    when together they gave under half of the held-out pairs. An RM that learned a hostile
    minority's taste is judged by the majority it inverts, and fails; one that learned the
    majority's is not failed by the minority that rates against it.
    """
    inverted = set()
    for rater, tally in verdicts.items():
        interval = wilson_interval(tally.agreed, tally.scored)
        if interval is not None and interval[1] < 0.5:
            inverted.add(rater)
    if 2 * sum(verdicts[r].scored for r in inverted) >= sum(t.scored for t in verdicts.values()):
        return set()  # a majority the RM inverts: it judges, and the RM fails
    return inverted


def judged_accuracy(verdicts: Mapping[str, Tally], left_out: set[str]) -> dict[str, float]:
    """Accuracy over the pairs of the raters who judge, with its Wilson 95% interval."""
    agreed = sum(t.agreed for rater, t in verdicts.items() if rater not in left_out)
    scored = sum(t.scored for rater, t in verdicts.items() if rater not in left_out)
    low, high = wilson_interval(agreed, scored) or (0.0, 1.0)
    return {"reward/accuracy": agreed / scored if scored else 0.0, "reward/accuracy_low": low,
            "reward/accuracy_high": high, "reward/judged_pairs": float(scored)}


def _evaluate(model: RewardModel, examples: list[Example], device: str) -> dict[str, float]:
    """Pairwise accuracy (Wilson 95% interval) and BT loss over groups; thumbs accuracy (sign)."""
    groups = [ex for ex in examples if ex.label is None]
    thumbs = [ex for ex in examples if ex.label is not None]
    sizes, tiers = [len(ex.sequences) for ex in groups], [ex.tiers for ex in groups]
    scores = score_sequences(model, [s for ex in groups for s in ex.sequences], device)
    accuracy, n_pairs = pairwise_accuracy(scores, sizes, tiers)
    low, high = wilson_interval(round(accuracy * n_pairs), n_pairs) or (0.0, 1.0)
    metrics = {
        "reward/accuracy": accuracy,
        "reward/accuracy_low": low,
        "reward/accuracy_high": high,
        "reward/loss": bradley_terry_loss(scores, sizes, tiers).item(),
        "reward/holdout_pairs": float(n_pairs),
    }
    if thumbs:
        thumb_scores = score_sequences(model, [ex.sequences[0] for ex in thumbs], device)
        labels = torch.tensor([ex.label for ex in thumbs])
        correct = (thumb_scores > 0).float() == labels
        metrics["reward/thumbs_accuracy"] = correct.float().mean().item()
    return metrics
