"""Routes of `/v1/chat/completions` and `/v1/completions`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from server import limits
from server.completions import serving
from server.completions.protocol import ChatCompletionRequest, CompletionRequest
from server.completions.responses import CompletionJob
from server.state import AppState, require_user

router = APIRouter()

POLICY_HEADER = "X-Flywheel-Policy"


async def _respond(state: AppState, jobs: list[CompletionJob], stream: bool, route: str):
    if stream:
        policy, events = await serving.start_stream(state, jobs, route)
        return limits.TimedStreamingResponse(
            events, write_timeout_s=state.settings.stream_write_timeout_s,
            media_type="text/event-stream",
            headers={POLICY_HEADER: policy, "Cache-Control": "no-cache",
                     "X-Accel-Buffering": "no"},
        )
    body, policy = await serving.complete(state, jobs, route)
    return JSONResponse(body, headers={POLICY_HEADER: policy})


async def _chat(state: AppState, request: ChatCompletionRequest, http: Request):
    job = await serving.prepare_chat(state, request, state.auth.rater(http, request.user),
                                     state.auth.tenant(http))
    return await _respond(state, [job], request.stream, "chat")


async def _text(state: AppState, request: CompletionRequest, http: Request):
    jobs = await serving.prepare_text(state, request, state.auth.rater(http, request.user),
                                      state.auth.tenant(http))
    return await _respond(state, jobs, request.stream, "text")


@router.post("/v1/chat/completions")
async def chat_completions(request: ChatCompletionRequest, http: Request,
                           state: Annotated[AppState, Depends(require_user)]):
    # A client gone before the answer (or a stream's first token) cancels the engine request.
    answer = await limits.unless_disconnected(http, _chat(state, request, http))
    return answer if answer is not None else Response(status_code=limits.CLIENT_CLOSED)


@router.post("/v1/completions")
async def completions(request: CompletionRequest, http: Request,
                      state: Annotated[AppState, Depends(require_user)]):
    answer = await limits.unless_disconnected(http, _text(state, request, http))
    return answer if answer is not None else Response(status_code=limits.CLIENT_CLOSED)
