"""The reward model: a scalar head on the policy's trunk, trained on rankings and thumbs."""

from trainer_worker.reward.model import RewardModel, is_reward_dir
from trainer_worker.reward.train import train_reward_model
from trainer_worker.stopping import TrainingInterrupted

__all__ = ["RewardModel", "TrainingInterrupted", "is_reward_dir", "train_reward_model"]
