"""The OpenAPI schema as the server really answers: FastAPI's, with its 422 validation errors
replaced by our 400 and the error envelope, the statuses of the key checks, streams, and the
bounds of the loaded model (max_tokens, token ids)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from flywheel.settings import Settings
from server.auth import keys_configured
from server.completions.bounds import document_bounds
from server.errors import ErrorResponse
from server.routes import iter_routes
from server.state import AppState, require_admin, require_user

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_VALIDATION_REF = "#/components/schemas/HTTPValidationError"
# One event of a stream (`stream: true`); OpenAPI before 3.2 has `schema` describe each event.
_SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string", "description": "A JSON chunk, an error "
                            "envelope, or `[DONE]`, the last event"}},
    "required": ["data"],
}


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Replace ``app.openapi`` (served at /openapi.json when docs are exposed)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            document(schema, app.routes, user_keys=bool(settings.api_key_list),
                     admin_keys=keys_configured(settings))
            state: AppState | None = getattr(app.state, "flywheel", None)
            if state is None:  # before start-up: no model loaded to bound, so not kept
                return schema
            document_bounds(schema["components"]["schemas"], state.engine,
                            settings.max_request_tokens)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any] | None]:
    for dependency in dependant.dependencies:
        yield dependency.call
        yield from _calls(dependency)


def document(schema: dict[str, Any], routes: list[Any], *, user_keys: bool,
             admin_keys: bool) -> None:
    """Edit FastAPI's schema in place to match what the handlers of ``routes`` send; the key
    checks only where keys are set (server/auth.py: without keys a route is open)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    envelope = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(envelope.pop("$defs", {}))
    components["ErrorResponse"] = envelope
    if admin_keys:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for route in iter_routes(routes):
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        calls = set(_calls(route.dependant))
        admin = require_admin in calls
        keyed = admin_keys if admin else user_keys and require_user in calls
        for method in (route.methods or set()) - {"HEAD"}:
            operation = schema["paths"][route.path_format][method.lower()]
            _document_operation(operation, route, admin=admin, keyed=keyed)
    if "HTTPValidationError" in components and _VALIDATION_REF not in str(schema["paths"]):
        del components["HTTPValidationError"], components["ValidationError"]


def _document_operation(operation: dict[str, Any], route: Any, *, admin: bool,
                        keyed: bool) -> None:
    responses = operation["responses"]
    validation = responses.get("422", {}).get("content", {}).get("application/json", {})
    if validation.get("schema", {}).get("$ref") == _VALIDATION_REF:
        del responses["422"]  # FastAPI's: validation errors are 400 here (server/errors.py)
    if operation.get("parameters") or operation.get("requestBody"):
        responses["400"] = _error("Invalid request: a field fails validation")
    if route.dependant.path_params:
        responses.setdefault("404", _error("No such resource"))
    if keyed:
        operation["security"] = [{"bearer": []}]
        responses["401"] = _error("Missing or unknown key (WWW-Authenticate: Bearer)")
        if admin:
            responses["403"] = _error("A valid key without the admin right")
    if "stream" in _body_fields(route):
        ok = responses["200"].setdefault("content", {})
        ok["text/event-stream"] = {"schema": _SSE_EVENT}
    # Every other failure (409, 429, 503, 500) is the same envelope: OpenAPI's `default`.
    responses["default"] = _error("Error")


def _body_fields(route: Any) -> set[str]:
    body = route.body_field
    model = getattr(body.field_info, "annotation", None) if body is not None else None
    return set(getattr(model, "model_fields", {}))
