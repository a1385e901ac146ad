"""JSON in and out with orjson.

Responses: orjson writes NumPy float32 arrays directly (no per-float Python objects), the main cost
of returning large vectors. Requests: a 600 KB body (one base64 image) took the event loop 0.96 ms
to parse with the standard library against 0.22 ms with orjson, and text bodies 2.5 against 0.5 us.
orjson's decode error is a json.JSONDecodeError, so FastAPI's "invalid JSON" answer is unchanged;
it refuses NaN/Infinity literals and integers beyond 64 bits, which the API never accepts anyway.
"""

from __future__ import annotations

from typing import Any, Callable

import orjson
from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import JSONResponse, Response


class FastJSONResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class FastJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = orjson.loads(await self.body())
        return self._json


class FastJSONRoute(APIRoute):
    """Every API route: its request body is parsed by orjson (FastAPI calls request.json())."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def parse_with_orjson(request: Request) -> Response:
            return await handler(FastJSONRequest(request.scope, request.receive))

        return parse_with_orjson
