"""JSON in and out with orjson, and the lean way the hot routes read their bodies.

Responses: orjson writes NumPy float32 arrays directly (no per-float Python objects), the main cost
of returning large vectors. Requests: a 600 KB body (one base64 image) took the event loop 0.96 ms
to parse with the standard library against 0.22 ms with orjson, and text bodies 2.5 against 0.5 us.
orjson's decode error is a json.JSONDecodeError, so FastAPI's "invalid JSON" answer is unchanged;
it refuses NaN/Infinity literals and integers beyond 64 bits, which the API never accepts anyway.

The embedding routes (/v1/embeddings, /embed/text) take the Request and read their body with
read_json_body (through deps.checked_json_body, which makes the key and media-type checks first)
instead of declaring a body parameter and `Depends(...)` checks: FastAPI's dependency solving,
body-field validation and content-type sniffing were a third of the Python calls the event loop
made per request (bench/request_path.py: 894 -> 602 per cache hit; docs/benchmarks.md, "Request
path"). The body model is still validated by pydantic, its errors reach the same 400 handler,
and json_body_docs keeps it in the OpenAPI schema.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response
from starlette.routing import request_response

M = TypeVar("M", bound=BaseModel)


class FastJSONResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class FastJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = orjson.loads(await self.body())
        return self._json


def takes_only_the_request(dependant: Dependant) -> bool:
    """An endpoint `async def f(request: Request)` with no dependencies (its router's included):
    FastAPI has nothing to solve, parse or validate for it."""
    d = dependant
    return (d.request_param_name is not None and not (
        d.path_params or d.query_params or d.header_params or d.cookie_params or d.body_params or d.dependencies
        or d.websocket_param_name or d.http_connection_param_name or d.response_param_name
        or d.background_tasks_param_name or d.security_scopes_param_name))


class FastJSONRoute(APIRoute):
    """Every API route: its request body is parsed by orjson (FastAPI calls request.json()).

    An async endpoint that takes only the Request and returns a Response (the embedding routes,
    which read their bodies with read_json_body) is run by Starlette's own request_response, as
    a plain Starlette route is: exceptions still reach the app's handlers, but FastAPI's request
    handler (two exit stacks, body sniffing, dependency solving, response serialisation) is
    skipped. It did nothing for such an endpoint and made a fifth of the Python calls of a cache
    hit (bench/request_path.py: 603 -> 475; docs/benchmarks.md)."""

    def __init__(self, path: str, endpoint: Callable, **kwargs) -> None:
        super().__init__(path, endpoint, **kwargs)
        if takes_only_the_request(self.dependant) and inspect.iscoroutinefunction(endpoint):
            self.app = request_response(endpoint)

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def parse_with_orjson(request: Request) -> Response:
            return await handler(FastJSONRequest(request.scope, request.receive))

        return parse_with_orjson


async def read_json_body(request: Request, model: type[M]) -> M:
    """The request body as `model`: parsed by orjson, validated by pydantic. Failures raise the
    RequestValidationError FastAPI would (locations under "body"), so the 400 answer is the same."""
    raw = await request.body()
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": e.msg}}]) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                      for err in e.errors(include_url=False)]) from None


def json_body_docs(model: type[BaseModel]) -> dict:
    """openapi_extra for a route that reads `model` with read_json_body: the body in /docs."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    assert "$defs" not in schema, f"{model.__name__} nests models: list them in the OpenAPI components"
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
