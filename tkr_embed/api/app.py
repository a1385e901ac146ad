"""create_app: the FastAPI application, wired to one EmbeddingService.

A request goes: RequestContextMiddleware (request id, body cap) -> route (routes/*.py) ->
EmbeddingService.embed (engine/service.py) -> cache / batcher -> MLX worker -> model.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import __version__
from ..config import Settings
from ..engine.service import EmbeddingService
from .errors import RequestContextMiddleware, install_error_handlers
from .routes import embed, similarity, system

log = logging.getLogger(__name__)


def create_app(settings: Settings, service: EmbeddingService | None = None) -> FastAPI:
    """Build the app. The service (and the model) start in the lifespan, before the first request."""
    service = service or EmbeddingService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        app.state.service = service
        try:
            yield
        finally:
            app.state.service = None
            await service.stop()

    docs = settings.server.docs_enabled
    app = FastAPI(
        title="tkr-embed",
        version=__version__,
        description="Local multimodal embedding server on MLX: text, images and text+image in one space.",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.settings = settings
    app.state.service = None
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.limits.max_body_bytes)
    for module in (system, embed, similarity):
        app.include_router(module.router)
    return app
