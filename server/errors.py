"""One error envelope for every failure: serving code raises ``APIError``, handlers format it."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from feedback_store.errors import (
    ConflictError,
    ForbiddenError,
    IdempotencyMismatchError,
    InvalidInputError,
    NotFoundError,
    StoreUnavailableError,
)
from server.routes import iter_routes

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The one error envelope (OpenAI's), documented in the OpenAPI schema."""

    error: ErrorDetail


class APIError(Exception):
    """An error with an HTTP status, rendered as ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, retry_after: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _ErrorJSON(JSONResponse):
    """Escapes non-ASCII: a message that quotes input holding a lone surrogate still encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(exc: APIError) -> JSONResponse:
    headers = dict(exc.headers or {})
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    elif exc.status in (429, 503):
        headers["Retry-After"] = "1"
    return _ErrorJSON(exc.body(), status_code=exc.status, headers=headers or None)


_LOCATIONS = ("body", "query", "path", "header")
_SCALARS = ("str", "int", "float", "bool", "none")


def _param_of(loc: tuple[Any, ...]) -> str | None:
    """The field of a validation error, without pydantic's union member tags (`str`,
    `list[int]`, `constrained-str`, `TextPart`) that its location carries."""
    parts = [str(p) for p in loc if p not in _LOCATIONS and not _union_tag(p)]
    return ".".join(parts) or None


def _union_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        "[" in part or part in _SCALARS or (part.islower() and "-" in part)
        or (part[:1].isupper() and part.isalnum()))


def _allowed_methods(request: Request) -> str:
    """Every method some route of this path accepts: Starlette's own 405 names only the methods
    of the first route that matched the path (GET and POST of one path are two routes here)."""
    methods: set[str] = set()
    for route in iter_routes(request.app.routes):
        if route.path_format and compile_path(route.path_format)[0].match(request.url.path):
            methods.update(route.methods or ())
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI and vLLM answer body validation errors with 400, not FastAPI's 422.
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = _param_of(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            message = "The request body is not valid JSON."
            param = None
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        return error_response(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail) if exc.detail else "error"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return error_response(APIError(exc.status_code, message, headers=headers))

    @app.exception_handler(NotFoundError)
    async def _not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return error_response(APIError(404, exc.message, param=exc.param, code=exc.code))

    @app.exception_handler(ForbiddenError)
    async def _forbidden(_: Request, exc: ForbiddenError) -> JSONResponse:
        return error_response(APIError(403, exc.message, param=exc.param, code=exc.code))

    @app.exception_handler(InvalidInputError)
    async def _invalid(_: Request, exc: InvalidInputError) -> JSONResponse:
        return error_response(APIError(400, exc.message, param=exc.param, code=exc.code))

    @app.exception_handler(ConflictError)
    async def _conflict(_: Request, exc: ConflictError) -> JSONResponse:
        return error_response(APIError(409, exc.message, param=exc.param, code=exc.code))

    @app.exception_handler(IdempotencyMismatchError)
    async def _mismatch(_: Request, exc: IdempotencyMismatchError) -> JSONResponse:
        return error_response(APIError(422, exc.message, param="Idempotency-Key",
                                       code="idempotency_key_reused"))

    @app.exception_handler(StoreUnavailableError)
    async def _unavailable(_: Request, exc: StoreUnavailableError) -> JSONResponse:
        log.warning("database unavailable: %s", exc.message)
        return error_response(APIError(503, "The feedback database is unavailable; retry later.",
                                       code="database_unavailable", retry_after=2))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(APIError(500, "Internal server error.", code="internal_error"))
