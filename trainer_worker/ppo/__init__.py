"""PPO on the policy (InstructGPT-style RLHF): maths in ``core``, rollouts, the training loop."""

from trainer_worker.ppo.trainer import run_ppo
from trainer_worker.stopping import TrainingInterrupted

__all__ = ["TrainingInterrupted", "run_ppo"]
