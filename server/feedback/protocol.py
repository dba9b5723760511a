"""Wire models of the feedback routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_RANKED = 16


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    completion_id: str = Field(min_length=1, max_length=128)
    choice_index: int = Field(default=0, ge=0)
    rating: Literal["up", "down"]
    comment: str | None = Field(default=None, max_length=10_000)
    user: str | None = Field(default=None, max_length=256)


class RankedItem(BaseModel):
    completion_id: str = Field(min_length=1, max_length=128)
    choice_index: int = Field(default=0, ge=0)


class RankingRequest(BaseModel):
    """Best first: the choices of one completion, or answers to one prompt from several."""

    model_config = ConfigDict(extra="ignore")

    completion_id: str | None = Field(default=None, min_length=1, max_length=128)
    ranking: list[int] | None = Field(default=None, min_length=2, max_length=MAX_RANKED)
    items: list[RankedItem] | None = Field(default=None, min_length=2, max_length=MAX_RANKED)
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _one_form(self) -> RankingRequest:
        by_completion = self.completion_id is not None or self.ranking is not None
        if by_completion == (self.items is not None):
            raise ValueError("give either completion_id with ranking, or items")
        if by_completion and (self.completion_id is None or self.ranking is None):
            raise ValueError("completion_id and ranking go together")
        return self

    def as_items(self) -> list[tuple[str, int]]:
        if self.items is not None:
            return [(i.completion_id, i.choice_index) for i in self.items]
        assert self.completion_id is not None and self.ranking is not None
        return [(self.completion_id, index) for index in self.ranking]
