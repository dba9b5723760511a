"""A request's cost: prompts x n x max_tokens, bounded by ``max_request_tokens`` (400 above it),
and the default max_tokens of a request that names none, kept within that bound."""

from __future__ import annotations

from server.completions.protocol import ChatCompletionRequest, CompletionRequest
from server.limits import bound_cost
from server.state import AppState

Req = ChatCompletionRequest | CompletionRequest


def _max_tokens_param(req: Req) -> str:
    """The field that set the request's max_tokens (``requested_max_tokens`` prefers it)."""
    return "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"


def bound_request_cost(state: AppState, req: Req, prompts: int, max_tokens: int,
                       name: str | None = None) -> None:
    """``max_request_tokens`` on prompts x n x ``max_tokens``, the value of the field ``name``
    (by default the one the request's max_tokens came from)."""
    name = name or _max_tokens_param(req)
    bound_cost(state, prompts * req.n * max_tokens,
               f"{prompts} prompt{'s' if prompts > 1 else ''} x n={req.n} x {name}={max_tokens}",
               name)


def default_budget(state: AppState, prompts: int, n: int) -> int:
    """The most a request that names no max_tokens gets per choice: what fits
    ``max_request_tokens`` (a request is never refused for a default it did not choose)."""
    return max(1, state.settings.max_request_tokens // (prompts * n))
