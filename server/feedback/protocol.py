"""Wire models of the feedback routes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from server.completions.protocol import Integral, RequestModel

MAX_RANKED = 16
Index = Annotated[int, Field(ge=0), Integral]  # a choice's index


class FeedbackRequest(RequestModel):
    model_config = ConfigDict(extra="ignore")

    completion_id: str = Field(min_length=1, max_length=128)
    choice_index: Index = 0
    rating: Literal["up", "down"]
    comment: str | None = Field(default=None, max_length=10_000)
    user: str | None = Field(default=None, max_length=256)


Signal = Literal["regenerate", "edit", "copy"]  # feedback_store.types.IMPLICIT_SIGNALS


class ImplicitRequest(RequestModel):
    """What a user did with an answer besides rating it: asked again for the same conversation,
    edited the question and sent it again, or copied the answer."""

    model_config = ConfigDict(extra="ignore")

    completion_id: str = Field(min_length=1, max_length=128)
    choice_index: Index = 0
    signal: Signal
    user: str | None = Field(default=None, max_length=256)


class RankedItem(RequestModel):
    completion_id: str = Field(min_length=1, max_length=128)
    choice_index: Index = 0


# What the store asks of a ranking's places (`feedback_store.rankings._tie_groups`), where a
# place is an answer or a tie group of them.
_PLACES = {"minItems": 2, "uniqueItems": True, "items": {"minItems": 1, "uniqueItems": True}}


def _only(given: tuple[str, ...], unset: tuple[str, ...]) -> dict[str, Any]:
    """JSON Schema of one form of a request: the fields ``given`` set, the ``unset`` ones not."""
    return {"required": list(given),
            "properties": {**{name: {"not": {"type": "null"}} for name in given},
                           **{name: {"type": "null"} for name in unset}}}


class RankingRequest(RequestModel):
    """Best first: the choices of one completion, or answers to one prompt from several. An
    entry may be a list of equally good answers (a tie group); each answer once, at most 16 in
    all (the store checks the groups)."""

    # The schema states `_one_form` (completion_id with ranking, or items, never both) and the
    # checks of the store's `_tie_groups` that JSON Schema can: two places at least, no empty tie
    # group, no answer twice in one group nor as two places. An answer both in a group and
    # outside it, or more than MAX_RANKED answers in all, it cannot: those stay a bare 400.
    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "oneOf": [_only(("completion_id", "ranking"), ("items",)),
                  _only(("items",), ("completion_id", "ranking"))],
        "allOf": [{"properties": {"ranking": _PLACES, "items": _PLACES}}]})

    completion_id: str | None = Field(default=None, min_length=1, max_length=128)
    ranking: list[Index | list[Index]] | None = Field(default=None, min_length=1,
                                                      max_length=MAX_RANKED)
    items: list[RankedItem | list[RankedItem]] | None = Field(default=None, min_length=1,
                                                              max_length=MAX_RANKED)
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _one_form(self) -> RankingRequest:
        by_completion = self.completion_id is not None or self.ranking is not None
        if by_completion == (self.items is not None):
            raise ValueError("give either completion_id with ranking, or items")
        if by_completion and (self.completion_id is None or self.ranking is None):
            raise ValueError("completion_id and ranking go together")
        if sum(len(e) if isinstance(e, list) else 1 for e in self.ranking or self.items or ()
               ) > MAX_RANKED:
            raise ValueError(f"a ranking holds at most {MAX_RANKED} answers")
        return self

    def as_items(self) -> list[tuple[str, int] | list[tuple[str, int]]]:
        """The entries as Store.add_ranking takes them: an answer, or a tie group of answers."""
        if self.items is not None:
            return [
                [(i.completion_id, i.choice_index) for i in e] if isinstance(e, list)
                else (e.completion_id, e.choice_index)
                for e in self.items
            ]
        assert self.completion_id is not None and self.ranking is not None
        cid = self.completion_id
        return [
            [(cid, index) for index in e] if isinstance(e, list) else (cid, e)
            for e in self.ranking
        ]
