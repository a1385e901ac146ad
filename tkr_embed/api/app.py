"""create_app: the FastAPI application, wired to one EmbeddingService.

A request goes, outermost first: RequestContextMiddleware (request id, body cap, stats) ->
AuthMiddleware (who is calling) -> slowapi (rate limit per key, or per address) -> route
(routes/*.py; its `require(...)` dependency checks permissions) -> EmbeddingService.embed
(engine/service.py) -> cache / batcher -> MLX worker -> model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import FastAPI
from slowapi.errors import RateLimitExceeded
from slowapi.middleware import SlowAPIASGIMiddleware

from .. import __version__
from ..auth.store import KeyStore
from ..config import Settings
from ..engine.fetch import ImageFetcher
from ..engine.pool import ModelPool
from ..engine.service import EmbeddingService
from .errors import RequestContextMiddleware, install_error_handlers
from .routes import admin, console, embed, openai, similarity, system
from .security import (
    AuthMiddleware,
    RateLimitContextMiddleware,
    build_limiter,
    flush_usage_periodically,
    rate_limit_exceeded,
)
from .metrics import Metrics
from .stats import RequestStats

log = logging.getLogger(__name__)

# The routes nearly every request takes: matched first (create_app).
HOT_PATHS = ("/v1/embeddings", "/embed/text")
# Routes no rate limit applies to: liveness probes and documentation.
UNLIMITED_PATHS = {"/health", "/ready", "/metrics", "/console", "/docs", "/docs/oauth2-redirect", "/openapi.json"}


def announce_bootstrap_key(token: str) -> None:
    """Shown once on the terminal (stdout, not the log): the store keeps only its digest."""
    bar = "=" * 72
    print(f"\n{bar}\ntkr-embed created an admin API key. It is shown only this once:\n\n    {token}\n\n"
          f"Create more with POST /admin/api-keys or `tkr-embed keys create`.\n{bar}\n", file=sys.stdout, flush=True)


def open_key_store(settings: Settings) -> KeyStore:
    if settings.security.database_url is None:
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    secret = settings.security.key_secret
    return KeyStore(settings.database_url, secret.get_secret_value() if secret else None)


def bootstrap_key(settings: Settings, store: KeyStore,
                  announce: Callable[[str], None] = announce_bootstrap_key) -> None:
    """First start with auth on, no master key and an empty store: create an admin key, show it once."""
    if settings.security.api_key is None and store.count() == 0:
        _, token = store.create("bootstrap-admin", ["admin"])
        announce(token)


def begin_drain(app: FastAPI) -> None:
    """Shutdown has begun: /ready answers 503 so balancers stop sending; requests still finish."""
    app.state.draining = True


def create_app(settings: Settings, service: EmbeddingService | None = None,
               announce: Callable[[str], None] = announce_bootstrap_key,
               background_load: bool = False,
               on_load_failure: Callable[[BaseException], None] | None = None,
               one_of_frontends: bool = False) -> FastAPI:
    """Build the app. The service (and the model) start in the lifespan.

    one_of_frontends: this app runs in one of several front-end processes (server.frontends > 1,
    serving.py): the engine process created any bootstrap key before starting them, and /metrics
    sums every front end's request metrics.

    background_load=False: before the first request is accepted (in-process use, tests).
    background_load=True (the server): the port opens at once, /health answers while the model
    loads and /ready says 503 until it is loaded and warm; on_load_failure is called if it fails."""
    service = service or EmbeddingService(settings)
    store = open_key_store(settings) if settings.security.require_api_key else None

    async def start_service(app: FastAPI) -> None:
        try:
            await service.start()
        except asyncio.CancelledError:  # shutdown while loading (a signal, or the port was taken): no model error
            raise
        except BaseException as e:  # noqa: BLE001 - reported; the server exits through on_load_failure
            app.state.load_error = f"{type(e).__name__}: {e}"
            if not background_load:
                raise
            log.error("the model failed to load: %s", app.state.load_error)
            if on_load_failure is not None:
                on_load_failure(e)
            return
        app.state.service = service
        try:  # then the other preloaded models of the pool (the default already serves meanwhile)
            await app.state.pool.start_preloaded()
        except Exception as e:  # noqa: BLE001 - the default model serves; the failure is logged and reported
            log.error("a preloaded model failed to load: %s", e)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        flusher = None
        if store is not None:
            if not one_of_frontends:
                bootstrap_key(settings, store, announce)
            flusher = asyncio.get_running_loop().create_task(flush_usage_periodically(store))
        loading = None
        if background_load:
            loading = asyncio.get_running_loop().create_task(start_service(app), name="model-load")
        else:
            await start_service(app)
        try:
            yield
        finally:
            app.state.draining = True
            if loading is not None and not loading.done():
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await loading
            app.state.service = None
            await app.state.pool.stop()
            await service.stop()
            if flusher:
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
            if store is not None:
                store.close()

    docs = settings.server.docs_enabled
    app = FastAPI(
        title="tkr-embed",
        version=__version__,
        description="Local multimodal embedding server on MLX: text, images and text+image in one space.",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
        telemetry=None if settings.server.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.service = None  # set once the model is loaded and warm: routes check this
    app.state.engine = service  # the same object from the start (metrics, /ready's reasons)
    app.state.pool = ModelPool(settings, service)  # the default model and settings.models
    app.state.draining = False
    app.state.load_error = None
    app.state.metrics = Metrics(app, multiprocess=one_of_frontends)
    service.on_batch = app.state.metrics.observe_batch
    app.state.key_store = store
    app.state.stats = RequestStats()
    app.state.stats.metrics = app.state.metrics
    app.state.image_fetcher = ImageFetcher(settings.image_urls)
    app.state.limiter = limiter = build_limiter(settings)
    install_error_handlers(app)
    app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded)
    for module in (system, embed, similarity, openai, admin, console):
        # The routes themselves, not include_router: FastAPI >= 0.16x wraps included routers in
        # one opaque route, and slowapi finds a request's endpoint by scanning app.routes (a
        # wrapped endpoint is not found and would never be rate limited). The routers' prefixes
        # and dependencies are already part of their routes.
        app.router.routes.extend(module.router.routes)
    # Starlette tries routes in order: the embedding routes first, not after a dozen others.
    app.router.routes.sort(key=lambda route: getattr(route, "path", None) not in HOT_PATHS)
    for route in app.routes:
        if getattr(route, "path", None) in UNLIMITED_PATHS:
            limiter.exempt(route.endpoint)
    # add_middleware wraps: the last added runs first.
    if settings.rate_limit.enabled:  # off: two middlewares less on every request
        app.add_middleware(SlowAPIASGIMiddleware)
        app.add_middleware(RateLimitContextMiddleware, settings=settings)
    app.add_middleware(AuthMiddleware, settings=settings, store=store)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.limits.max_body_bytes, stats=app.state.stats,
                       access_log=settings.logging.access)
    return app
