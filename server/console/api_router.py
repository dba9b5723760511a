"""Serves the console's static files; the page itself calls only the public /v1 API.

The page is open even when keys are set (it holds no data): it asks for the admin key, keeps it
in the browser session (sessionStorage), and sends it as a bearer header on each API call.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from server.errors import APIError

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).parent / "static"
# name -> media type; only these files are served (no path from the URL reaches the disk)
FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
}
HEADERS = {
    # Scripts and data from this origin only; uPlot sizes its elements with inline styles.
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated by ETag: a new release shows at once
}


def _file(name: str) -> FileResponse:
    if name not in FILES:
        raise APIError(404, f"No console file '{name}'", code="not_found")
    return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS)


@router.get("/console")
async def console() -> FileResponse:
    return _file("index.html")


@router.get("/console/")
async def console_slash() -> RedirectResponse:
    return RedirectResponse("/console", status_code=308)


@router.get("/console/static/{name}")
async def static(name: str) -> FileResponse:
    return _file(name)
