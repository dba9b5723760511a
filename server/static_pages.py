"""The browser pages' static files (the console, the chat page): a fixed list per page, so no
path from the URL reaches the disk, served with headers that keep each page to this origin."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi.responses import FileResponse

from server.errors import APIError

# Scripts, styles and data from this origin only, never framed; a page that needs more (the
# console's uPlot sets inline styles) adds to it.
CSP = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True)
class PageFiles:
    """The files of one page: `names` in `directory`, each with its media type."""

    what: str  # the page, for the 404's message
    directory: Path
    names: dict[str, str]  # name -> media type
    csp: str = CSP
    headers: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", {
            "Content-Security-Policy": self.csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",  # revalidated by ETag: a new release shows at once
        })

    @classmethod
    def of(cls, what: str, directory: Path, *names: str, csp: str = CSP) -> PageFiles:
        """The page's files, each typed by its suffix."""
        return cls(what, directory, {name: MEDIA_TYPES[Path(name).suffix] for name in names},
                   csp)

    def response(self, name: str) -> FileResponse:
        if name not in self.names:
            raise APIError(404, f"No {self.what} file '{name}'", code="not_found")
        return FileResponse(self.directory / name, media_type=self.names[name],
                            headers=self.headers)
