"""Serves the chat page's static files; the page itself calls only the public /v1 API.

Open even when keys are set (it holds no data): it asks for an API key, keeps it in the browser
session (sessionStorage, as the console keeps the admin key) and sends it as a bearer header.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.static_pages import PageFiles

router = APIRouter(include_in_schema=False)

FILES = PageFiles.of("chat", Path(__file__).parent / "static", "index.html", "chat.js",
                     "chat.css", "favicon.svg")


@router.get("/")
async def home() -> FileResponse:
    return FILES.response("index.html")


@router.get("/chat")
async def chat() -> FileResponse:
    return FILES.response("index.html")


@router.get("/chat/static/{name}")
async def static(name: str) -> FileResponse:
    return FILES.response(name)
