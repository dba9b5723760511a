"""SQL storage of served completions, user feedback, policy versions and training runs.

Shared by the server and the trainer worker; imports neither FastAPI nor torch.
"""

from feedback_store.store import Store
from feedback_store.types import (
    NewChoice,
    NewCompletion,
    PreferenceGroup,
    PromptRecord,
    RewardData,
    ThumbExample,
)

__all__ = [
    "NewChoice",
    "NewCompletion",
    "PreferenceGroup",
    "PromptRecord",
    "RewardData",
    "Store",
    "ThumbExample",
]
