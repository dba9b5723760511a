"""Train the reward model on ranked groups and lone thumbs, then write it to a directory."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from feedback_store.types import PreferenceGroup, ThumbExample
from flywheel.hf_progress import transformers_bars
from flywheel.settings import RewardConfig
from trainer_worker.reward.data import (
    Example,
    group_example,
    pad_right,
    split_holdout,
    thumb_example,
)
from trainer_worker.reward.losses import (
    bradley_terry_loss,
    pairwise_accuracy,
    pointwise_logistic_loss,
)
from trainer_worker.reward.model import RewardModel, is_reward_dir
from trainer_worker.reward.stopping import check_stop


class RewardDataLike(Protocol):
    groups: list[PreferenceGroup]
    thumbs: list[ThumbExample]


def train_reward_model(
    init_dir: Path,
    data: RewardDataLike,
    cfg: RewardConfig,
    out_dir: Path,
    *,
    device: str = "cpu",
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Fit the RM (fresh head on a base model, or continue a previous RM) and save it.

    Raises ``TrainingInterrupted`` (writing nothing) when ``should_stop()`` turns true.
    """
    if not data.groups and not data.thumbs:
        raise ValueError("no reward data: need at least one preference group or thumb")
    # 1. Model: continue the previous reward model, or put a fresh head on the base policy.
    with transformers_bars(progress):
        if is_reward_dir(Path(init_dir)):
            model = RewardModel.from_pretrained(init_dir, device=device)
        else:
            model = RewardModel.from_base(init_dir, device=device, seed=cfg.seed)
    eos, max_len = model.eos_token_ids, cfg.max_length
    # 2. Hold out whole groups (and some thumbs), so pairs of one ranking never straddle the split.
    train_groups, holdout_groups = split_holdout(data.groups, cfg.holdout_fraction, cfg.seed)
    train_thumbs, holdout_thumbs = split_holdout(data.thumbs, cfg.holdout_fraction, cfg.seed)
    train = [group_example(g, eos, max_len) for g in train_groups]
    train += [thumb_example(t, eos, max_len) for t in train_thumbs]
    holdout = [group_example(g, eos, max_len) for g in holdout_groups]
    holdout += [thumb_example(t, eos, max_len) for t in holdout_thumbs]
    # 3. Epochs of shuffled minibatches of groups and thumbs.
    train_loss = _fit(model, train, cfg, device, progress, should_stop)
    # 4. Normalisation statistics of the scores on the training answers.
    model.score_mean, model.score_std = _score_stats(model, train, device)
    # 5. Held-out accuracy (training data when nothing could be held out).
    metrics = _evaluate(model, holdout or train, cfg, device)
    check_stop(should_stop)
    with transformers_bars(progress):
        model.save_pretrained(Path(out_dir))
    n_train_pairs = sum(_n_pairs(len(ex.sequences)) for ex in train if ex.label is None)
    metrics.update({
        "reward/train_loss": train_loss,
        "reward/pairs": float(n_train_pairs),
        "reward/groups": float(len(train_groups)),
        "reward/thumbs": float(len(train_thumbs)),
        "reward/holdout_groups": float(len(holdout_groups)),
        "reward/score_mean": model.score_mean,
        "reward/score_std": model.score_std,
    })
    if not holdout:
        metrics["reward/holdout_pairs"] = 0.0
    return metrics


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
    loss = bradley_terry_loss(scores[:n_group_answers], [len(ex.sequences) for ex in groups])
    if thumbs:
        loss = loss + pointwise_weight * pointwise_logistic_loss(scores[n_group_answers:], labels)
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


def _evaluate(model: RewardModel, examples: list[Example], cfg: RewardConfig,
              device: str) -> dict[str, float]:
    """Pairwise accuracy and BT loss over groups; thumbs accuracy (sign of the score)."""
    groups = [ex for ex in examples if ex.label is None]
    thumbs = [ex for ex in examples if ex.label is not None]
    sizes = [len(ex.sequences) for ex in groups]
    scores = score_sequences(model, [s for ex in groups for s in ex.sequences], device)
    accuracy, n_pairs = pairwise_accuracy(scores, sizes)
    metrics = {
        "reward/accuracy": accuracy,
        "reward/loss": bradley_terry_loss(scores, sizes).item(),
        "reward/holdout_pairs": float(n_pairs),
    }
    if thumbs:
        thumb_scores = score_sequences(model, [ex.sequences[0] for ex in thumbs], device)
        labels = torch.tensor([ex.label for ex in thumbs])
        correct = (thumb_scores > 0).float() == labels
        metrics["reward/thumbs_accuracy"] = correct.float().mean().item()
    return metrics


def _n_pairs(k: int) -> int:
    return k * (k - 1) // 2
