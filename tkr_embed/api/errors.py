"""One error envelope for every failure, and the request-id / body-size middleware.

Every error response is {"error": {"type", "message", "request_id", "param"?}} with the right
status. Messages never carry stack traces, file paths or key material.
"""

from __future__ import annotations

import logging
import re
import time
import itertools
import os

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger(__name__)
access_log = logging.getLogger("tkr_embed.access")  # one line per request (logs.py formats it)

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Request ids: a random per-process prefix and a counter, unique without a syscall per request
# (uuid4 reads the OS's random source each time, which showed in cache-hit profiles).
_ID_PREFIX = os.urandom(8).hex()
_request_ids = (f"{_ID_PREFIX}{n:016x}" for n in itertools.count())


class APIError(Exception):
    def __init__(self, status: int, type_: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.param = param
        self.headers = headers or {}


def request_id_of(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or "-"


# OpenAI's error types by status, for the /v1 API (its SDKs pick exception classes by status;
# `type` and `code` are what clients log and branch on).
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error",
                 500: "server_error", 503: "server_error"}


def envelope(path: str, status: int, type_: str, message: str, request_id: str, param: str | None = None) -> bytes:
    """The error body: tkr-embed's native shape, or OpenAI's on /v1 paths.

    native: {"error": {"type", "message", "request_id", "param"?}}
    /v1:    {"error": {"message", "type", "param", "code"}}  (request id in the X-Request-ID header)
    """
    if path.startswith("/v1/"):
        body = {"message": message, "type": _OPENAI_TYPES.get(status, "invalid_request_error"),
                "param": param, "code": type_}
    else:
        body = {"type": type_, "message": message, "request_id": request_id}
        if param is not None:
            body["param"] = param
    return orjson.dumps({"error": body})


def error_response(request: Request, status: int, type_: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    body = envelope(request.url.path, status, type_, message, request_id_of(request), param)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


_STATUS_TYPES = {
    400: "invalid_request", 401: "authentication_error", 403: "permission_denied", 404: "not_found",
    405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type",
    429: "rate_limit_exceeded", 503: "service_unavailable",
}


def _loc_to_param(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


INTERNAL_ERROR_MESSAGE = "the server failed to process this request; the request id is in the logs"


def log_unexpected(exc: BaseException, method: str | None, path: str | None, request_id: str) -> None:
    """One line at ERROR (a stack trace may hold paths or data); the trace only at DEBUG."""
    log.error("unhandled %s on %s %s (request %s)", type(exc).__name__, method, path, request_id)
    log.debug("traceback for request %s", request_id, exc_info=exc)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request, exc.status, exc.type, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        param = _loc_to_param(tuple(first.get("loc", ())))
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            param, msg = "body", "request body is not valid JSON"
        elif first.get("type") == "missing":
            msg = f"'{param}' is required"
        else:
            msg = f"{param}: {msg}"
        if len(errors) > 1:
            msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_response(request, 400, "invalid_request", msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        type_ = _STATUS_TYPES.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else type_
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        return error_response(request, exc.status_code, type_, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log_unexpected(exc, request.method, request.url.path, request_id_of(request))
        return error_response(request, 500, "internal_error", INTERNAL_ERROR_MESSAGE)


def _int_reset(header: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    """X-RateLimit-Reset as whole epoch seconds (the limits library reports a float)."""
    name, value = header
    if name.lower() == b"x-ratelimit-reset" and b"." in value:
        try:
            return name, str(int(float(value))).encode()
        except ValueError:
            pass
    return header


class BodyTooLarge(StarletteHTTPException):
    """Raised from inside receive(); an HTTPException so that FastAPI's body parsing re-raises it
    as it is (it wraps other exceptions into a generic 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the limit of {limit} bytes (limits.max_body_bytes)")


class RequestContextMiddleware:
    """Pure ASGI: assigns X-Request-ID (the client's when sane), caps the body size, and turns
    a body over the cap into a 413 envelope, whether or not Content-Length was sent."""

    def __init__(self, app, max_body_bytes: int, stats=None, access_log: bool = False):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.stats = stats
        self.access_log = access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = None
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                given = value.decode("latin-1")
            elif name == b"content-length":
                length = value
        rid = given if given and _SANE_REQUEST_ID.match(given) else next(_request_ids)
        scope.setdefault("state", {})["request_id"] = rid
        rid_header = (b"x-request-id", rid.encode())
        started = False
        status = 500
        t0 = time.perf_counter()

        async def send_with_id(message):
            nonlocal started, status
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = [_int_reset(h) for h in message.get("headers", [])]
                message = {**message, "headers": [*headers, rid_header]}
            await send(message)

        async def reject(status: int, type_: str, msg: str):
            body = envelope(scope.get("path", ""), status, type_, msg, rid)
            await send_with_id({"type": "http.response.start", "status": status,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        limit = self.max_body_bytes
        too_large = f"request body is larger than the limit of {limit} bytes (limits.max_body_bytes)"
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await reject(400, "invalid_request", "Content-Length is not a number")
            if declared > limit:
                return await reject(413, "request_too_large", too_large)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counting_receive, send_with_id)
        except BodyTooLarge:
            if not started:
                await reject(413, "request_too_large", too_large)
        except Exception as exc:  # noqa: BLE001
            # Caught here, inside Starlette's ServerErrorMiddleware, which would re-raise it for
            # the server to log with a stack trace.
            log_unexpected(exc, scope.get("method"), scope.get("path"), rid)
            if not started:
                status = 500
                await reject(500, "internal_error", INTERNAL_ERROR_MESSAGE)
        finally:
            if self.stats is not None:
                route = scope.get("route")
                principal = scope["state"].get("principal")
                path = getattr(route, "path", "(unmatched)")
                seconds = time.perf_counter() - t0
                items = getattr(principal, "items", 0)
                self.stats.record(path, status, seconds, items)
                if self.access_log and access_log.isEnabledFor(logging.INFO):
                    key_id = getattr(principal, "key_id", None)
                    access_log.info("%s %s %d %.1fms items=%d key=%s rid=%s", scope.get("method"), path, status,
                                    seconds * 1000, items, key_id or "-", rid,
                                    extra={"request_id": rid, "key_id": key_id, "method": scope.get("method"),
                                           "route": path, "status": status, "items": items,
                                           "latency_ms": round(seconds * 1000, 2)})
