"""What a completion request may ask of the loaded model, whatever its prompt says: max_tokens
within the context and ``max_request_tokens``, token ids within the vocabulary. Checked before
tokenising, and stated in the served schema, so that a request the schema allows is one the
server takes (what the prompt's tokens leave is not refused: an answer ends where the context
does)."""

from __future__ import annotations

from typing import Any

from server.completions.budget import bound_request_cost
from server.completions.protocol import MAX_N, ChatCompletionRequest, CompletionRequest
from server.engines.base import Engine
from server.errors import APIError
from server.state import AppState

Req = ChatCompletionRequest | CompletionRequest
# Each request model's max_tokens fields (a chat's max_completion_tokens wins over its
# max_tokens; both are bounded).
FIELDS: dict[type[Req], tuple[str, ...]] = {
    ChatCompletionRequest: ("max_completion_tokens", "max_tokens"),
    CompletionRequest: ("max_tokens",),
}


def check_requested(state: AppState, req: Req, prompts: int) -> None:
    """400 for a max_tokens field set past what any prompt allows: with ``prompts`` x n past
    ``max_request_tokens`` (``request_too_costly``), or past the context less a prompt of one
    token (``context_length_exceeded``)."""
    limit = state.engine.max_model_len
    for name in FIELDS[type(req)]:
        value: int | None = getattr(req, name)
        if value is None:
            continue
        bound_request_cost(state, req, prompts, value, name)
        if value >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, the "
                           f"prompt's included: {name} may be at most {limit - 1}, not {value}.",
                           param=name, code="context_length_exceeded")


def vocabulary(engine: Engine) -> int | None:
    """How many token ids the engine's tokenizer spells (vLLM's check: no id above the largest);
    None for an engine that takes any."""
    tokenizer = getattr(engine, "tokenizer", None)
    return len(tokenizer) if tokenizer is not None else getattr(engine, "vocab_size", None)


def known_tokens(state: AppState, prompt_ids: list[int], param: str) -> list[int]:
    """``prompt_ids``, or 400 for an id past the vocabulary."""
    vocab = vocabulary(state.engine)
    if vocab is not None and max(prompt_ids) >= vocab:
        raise APIError(400, f"Token id {max(prompt_ids)} is out of vocabulary (ids lie in "
                       f"[0, {vocab})).", param=param, code="invalid_value")
    return list(prompt_ids)


def document_bounds(components: dict[str, Any], engine: Engine, max_request_tokens: int) -> None:
    """State the checks above in the request models of the served schema's ``components``, all
    but one: the share of ``max_request_tokens`` of a request with several prompts. Stating it
    takes a clause for each n and count of prompts, more than schema tools (schemathesis) can
    unfold, so it is told in words (``protocol.MAX_TOKENS``)."""
    for model, names in FIELDS.items():
        clauses = components[model.__name__].setdefault("allOf", [])
        clauses.extend(_max_tokens_clauses(names, engine.max_model_len, max_request_tokens))
    vocab = vocabulary(engine)
    if vocab is not None:  # `maximum` binds the ids of a token-id prompt or of a list of them
        known = {"maximum": vocab - 1, "items": {"maximum": vocab - 1}}
        components[CompletionRequest.__name__]["allOf"].append(
            {"properties": {"prompt": {"items": known}}})


def _max_tokens_clauses(names: tuple[str, ...], max_model_len: int,
                        max_request_tokens: int) -> list[dict[str, Any]]:
    """Each field at most the context less one and ``max_request_tokens``, and where n makes the
    cost the tighter bound, ``max_request_tokens // n``. A clause for n binds every larger n
    with a bound no looser than its own, so the tightest that applies is the exact one."""
    cap = min(max_model_len - 1, max_request_tokens)
    clauses: list[dict[str, Any]] = [_at_most(names, cap)]
    for n in range(2, MAX_N + 1):
        if max_request_tokens // n < cap:
            clauses.append({"if": {"properties": {"n": {"type": "integer", "minimum": n}},
                                   "required": ["n"]},
                            "then": _at_most(names, max_request_tokens // n)})
    return clauses


def _at_most(names: tuple[str, ...], bound: int) -> dict[str, Any]:
    return {"properties": {name: {"maximum": bound} for name in names}}
