"""Routes of `/v1/chat/completions` and `/v1/completions`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse

from server.completions import serving
from server.completions.protocol import ChatCompletionRequest, CompletionRequest
from server.state import AppState, require_user

router = APIRouter()

POLICY_HEADER = "X-Flywheel-Policy"


async def _respond(state: AppState, job: serving.CompletionJob, stream: bool, route: str):
    if stream:
        policy, events = await serving.start_stream(state, job, route)
        return StreamingResponse(
            events, media_type="text/event-stream",
            headers={POLICY_HEADER: policy, "Cache-Control": "no-cache",
                     "X-Accel-Buffering": "no"},
        )
    body, policy = await serving.complete(state, job, route)
    return JSONResponse(body, headers={POLICY_HEADER: policy})


@router.post("/v1/chat/completions")
async def chat_completions(request: ChatCompletionRequest,
                           state: Annotated[AppState, Depends(require_user)]):
    job = serving.prepare_chat(state, request)
    return await _respond(state, job, request.stream, "chat")


@router.post("/v1/completions")
async def completions(request: CompletionRequest,
                      state: Annotated[AppState, Depends(require_user)]):
    job = serving.prepare_text(state, request)
    return await _respond(state, job, request.stream, "text")
