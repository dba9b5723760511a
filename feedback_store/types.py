"""Plain records that cross the store's boundary (no SQLAlchemy, FastAPI or torch types)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from flywheel.raters import ANONYMOUS, Rater, is_untrusted_key

__all__ = ["ANONYMOUS", "Rater", "is_untrusted_key"]

RaterThumbs = dict[str, tuple[int, int]]  # identity of the rater -> (thumbs up, thumbs down)
# {"feedback": id, "rankings": id, "implicit": id}: the last ids a window reached
Marks = dict[str, int]
# What a user did with an answer besides rating it (feedback_store/implicit.py).
IMPLICIT_SIGNALS = ("regenerate", "edit", "copy")
# Implicit signals read as a weak thumb when trained on: a copy keeps the answer, the others
# ask for another (an edit is sent on the answer that preceded the edited question).
IMPLICIT_UP = frozenset({"copy"})


@dataclass(frozen=True)
class PooledLive:
    """A version's thumbs pooled across raters (flywheel/rater_pooling.py) when last computed:
    weighted counts, the variance of their approval, the raters, and when (Unix seconds)."""

    up: float
    down: float
    variance: float
    raters: int
    at: float


@dataclass(frozen=True)
class RewardModelState:
    """What the next cycle carries on from a stored reward model."""

    id: str
    path: str | None
    watermark: Marks  # the last ids its window reached: the next window's "new" lies above
    trained_on_train_split: bool  # never saw a held-out prompt: the next RM may start from it


@dataclass(frozen=True)
class NewChoice:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]  # of the sampled tokens, as sampled (after temperature / top-p)
    finish_reason: str  # "stop" or "length"
    # The version that wrote this answer, when not the completion's: a canary assigned per
    # request splits a request's answers between the two arms (server/canary_split.py).
    policy_version: str | None = None


@dataclass(frozen=True)
class NewCompletion:
    """One served request with all its choices, stored in one transaction."""

    id: str  # the response id ("chatcmpl-..." or "cmpl-..."), used by feedback
    kind: Literal["chat", "text"]
    prompt_text: str  # the rendered prompt (chat template applied for chat)
    prompt_token_ids: list[int]
    messages: list[dict[str, Any]] | None  # the chat messages, None for text prompts
    model: str  # served model name
    policy_version: str  # e.g. "policy-3": the version of its first answer
    params: dict[str, Any]  # sampling parameters as requested (temperature, top_p, n, ...)
    choices: list[NewChoice]
    user: str | None = None
    created_at: float | None = None  # unix seconds; now when None
    key_scope: str | None = None  # the API key it was served to: only that key may rate it


@dataclass(frozen=True)
class PreferenceGroup:
    """Answers to one prompt, best first: a ranking of K, or an up/down thumbs pair (K = 2).

    The reward model trains on all K-choose-2 pairs of a group as one element (InstructGPT).
    """

    prompt_token_ids: list[int]
    answers: list[list[int]]  # token ids of each answer, best first
    source: Literal["ranking", "thumbs"]
    # Tier of each answer (non-decreasing, 0 = best); answers of one tier are tied and form no
    # pair. None: every answer its own tier (a strict order).
    tiers: list[int] | None = None
    identity: str = ANONYMOUS  # who gave it (feedback_store/identities.py)
    new: bool = True  # given after the RM in service was trained (so never seen by it)
    weight: float = 1.0  # loss weight: the identity's weight, and class balance for thumbs


@dataclass(frozen=True)
class ThumbExample:
    """A thumbs rating with no opposite rating on the same prompt: a pointwise label; or an
    implicit signal taken as a weak one (`source` "implicit": copy up, regenerate and edit
    down, weighted by `feedback.implicit_weight`)."""

    prompt_token_ids: list[int]
    answer_token_ids: list[int]
    label: bool  # True for "up"
    identity: str = ANONYMOUS
    new: bool = True
    weight: float = 1.0
    source: Literal["thumbs", "implicit"] = "thumbs"


@dataclass(frozen=True)
class PromptRecord:
    id: int
    prompt_token_ids: list[int]
    prompt_text: str
    messages: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class RewardData:
    groups: list[PreferenceGroup] = field(default_factory=list)
    thumbs: list[ThumbExample] = field(default_factory=list)
