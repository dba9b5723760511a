"""Serves the console's static files; the page itself calls only the public /v1 API.

The page is open even when keys are set (it holds no data): it asks for the admin key, keeps it
in the browser session (sessionStorage), and sends it as a bearer header on each API call.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from server.static_pages import CSP, PageFiles

router = APIRouter(include_in_schema=False)

# Only these files are served; uPlot sizes its elements with inline styles, and draws on
# canvases the page may export as data: images.
FILES = PageFiles("console", Path(__file__).parent / "static", {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
}, csp=CSP + "; style-src 'self' 'unsafe-inline'; img-src 'self' data:")


@router.get("/console")
async def console() -> FileResponse:
    return FILES.response("index.html")


@router.get("/console/")
async def console_slash() -> RedirectResponse:
    return RedirectResponse("/console", status_code=308)


@router.get("/console/static/{name}")
async def static(name: str) -> FileResponse:
    return FILES.response(name)
