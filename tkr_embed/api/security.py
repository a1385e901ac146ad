"""Who is calling, what they may do, and how often.

AuthMiddleware (ASGI) reads the key from `X-API-Key` or `Authorization: Bearer` (or `?api_key=`
when enabled), checks it against the store, and records the caller in the request scope. It
never rejects by itself: the route's `require(...)` dependency answers 401 (no, malformed,
unknown, expired or revoked key) or 403 (missing permission). The rate limiter (slowapi) runs
after it and counts per key id, or per client address for anonymous callers (auth off, or a
request about to be refused), so failed guesses are limited too.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Awaitable, Callable
from urllib.parse import parse_qs

import anyio
from fastapi import Request
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded

from ..auth.keys import PERMISSIONS, grants
from ..auth.store import AuthFailure, KeyStore
from ..config import Settings
from .errors import APIError, error_response

log = logging.getLogger(__name__)

MASTER_ID = "master"
MAX_HEADER_KEY_LENGTH = 512


@dataclass
class Principal:
    """The caller of one request."""

    key_id: str | None = None  # None: anonymous
    permissions: frozenset[str] = frozenset()
    rate_limits: dict | None = None  # per-key overrides
    failure: str | None = None  # why a presented key was refused
    items: int = field(default=0)  # filled by routes, for usage accounting


def _bearer(value: str) -> str | None:
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class AuthMiddleware:
    def __init__(self, app, settings: Settings, store: KeyStore | None):
        self.app = app
        self.enabled = settings.security.require_api_key
        self.allow_query = settings.security.allow_query_key
        self.store = store
        master = settings.security.api_key
        # Only a digest of the master key is kept in memory.
        self._master_digest = hashlib.sha256(master.get_secret_value().encode()).digest() if master else None

    def _presented_key(self, scope) -> tuple[str | None, str | None]:
        """(key, problem). A header that is present but unusable is a problem, not an absence."""
        api_key = auth = None
        for name, value in scope.get("headers", ()):
            if name == b"x-api-key":
                api_key = value
            elif name == b"authorization":
                auth = value
        raw = api_key if api_key is not None else auth
        if raw is not None:
            if len(raw) > MAX_HEADER_KEY_LENGTH:
                return None, "malformed API key"
            try:
                text = raw.decode("ascii").strip()
            except UnicodeDecodeError:
                return None, "malformed API key"
            if api_key is None:
                token = _bearer(text)
                return (token, None) if token else (None, "Authorization header must be 'Bearer <key>'")
            return (text, None) if text else (None, "empty X-API-Key header")
        if self.allow_query and scope.get("query_string"):
            values = parse_qs(scope["query_string"].decode("latin-1")).get("api_key")
            if values:
                return values[0], None
        return None, None

    def _authenticate(self, token: str) -> Principal:
        if self._master_digest is not None and hmac.compare_digest(
                hashlib.sha256(token.encode()).digest(), self._master_digest):
            return Principal(MASTER_ID, frozenset(PERMISSIONS))
        record = self.store.authenticate(token)
        return Principal(record.id, frozenset(record.permissions), record.rate_limits)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        principal = Principal()
        if self.enabled:
            token, problem = self._presented_key(scope)
            if problem:
                principal.failure = problem
            elif token:
                try:
                    principal = await anyio.to_thread.run_sync(self._authenticate, token)
                except AuthFailure as e:
                    principal = Principal(failure=e.reason)
        scope.setdefault("state", {})["principal"] = principal
        try:
            await self.app(scope, receive, send)
        finally:
            if principal.key_id and principal.key_id != MASTER_ID and self.store is not None:
                self.store.record_usage(principal.key_id, 1, principal.items)


def principal_of(request: Request) -> Principal:
    return request.scope.get("state", {}).get("principal") or Principal()


def check_permissions(request: Request, *permissions: str, any_key: bool = False) -> Principal:
    """The caller must hold every permission listed (admin holds all); any_key: a valid key of any
    permission is enough (e.g. /info). Raises 401/403; returns the caller."""
    settings: Settings = request.app.state.settings
    p = principal_of(request)
    if not settings.security.require_api_key:
        return p
    if p.key_id is None:
        reason = p.failure or "an API key is required (X-API-Key or Authorization: Bearer)"
        raise APIError(401, "authentication_error", reason, headers={"WWW-Authenticate": "Bearer"})
    if not any_key:
        missing = [perm for perm in permissions if not grants(p.permissions, perm)]
        if missing:
            raise APIError(403, "permission_denied", f"this API key lacks the permission {', '.join(missing)}")
    return p


def require(*permissions: str, any_key: bool = False) -> Callable[[Request], Awaitable[Principal]]:
    """Route dependency: check_permissions for these permissions.
    async, like every dependency on the request path: FastAPI runs a plain `def` dependency in its
    thread pool, a thread hand-off per request that cost more than a whole cache hit."""

    async def dependency(request: Request) -> Principal:
        return check_permissions(request, *permissions, any_key=any_key)

    return dependency


# ---- rate limiting ----------------------------------------------------------------------
def rate_limit_identity(request: Request) -> str:
    p = principal_of(request)
    if p.key_id:
        return f"key:{p.key_id}"
    return f"addr:{request.client.host if request.client else 'unknown'}"


# slowapi evaluates application-wide limits without the request, so the caller's limits (the
# server defaults, or the key's overrides) reach it through this context variable, set per
# request by RateLimitContextMiddleware. ASGI middlewares run in one task: the value carries.
_caller_limits: ContextVar[str] = ContextVar("tkr_caller_limits")


def caller_limits() -> str:
    return _caller_limits.get()


def limits_string(defaults: dict, overrides: dict | None) -> str:
    lim = {**defaults, **(overrides or {})}
    return f"{lim['burst']}/second;{lim['per_minute']}/minute;{lim['per_hour']}/hour;{lim['per_day']}/day"


def build_limiter(settings: Settings) -> Limiter:
    return Limiter(
        key_func=rate_limit_identity,
        application_limits=[caller_limits],  # one budget per caller, shared by all routes
        storage_uri=settings.rate_limit.storage_uri.get_secret_value(),
        headers_enabled=True,
        enabled=settings.rate_limit.enabled,
        key_prefix="tkr",
    )


class RateLimitContextMiddleware:
    """Between auth and slowapi: makes the caller's limits (per-key overrides) the ones checked."""

    def __init__(self, app, settings: Settings):
        self.app = app
        rl = settings.rate_limit
        self.defaults = {"per_minute": rl.per_minute, "per_hour": rl.per_hour, "per_day": rl.per_day,
                         "burst": rl.burst}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        principal = scope.get("state", {}).get("principal")
        token = _caller_limits.set(limits_string(self.defaults, getattr(principal, "rate_limits", None)))
        try:
            await self.app(scope, receive, send)
        finally:
            _caller_limits.reset(token)


async def rate_limit_exceeded(request: Request, exc: RateLimitExceeded):
    stats = getattr(request.app.state, "stats", None)
    if stats is not None:
        stats.record_rate_limited()
    response = error_response(request, 429, "rate_limit_exceeded",
                              f"rate limit exceeded: {exc.detail}; retry after the Retry-After seconds")
    response = request.app.state.limiter._inject_headers(response, request.state.view_rate_limit)  # noqa: SLF001
    return response


async def flush_usage_periodically(store: KeyStore, every: float = 2.0) -> None:
    while True:
        await asyncio.sleep(every)
        try:
            await anyio.to_thread.run_sync(store.flush_usage)
        except Exception as e:  # noqa: BLE001 - usage counters must never take the server down
            log.warning("could not write key usage: %s", type(e).__name__)
