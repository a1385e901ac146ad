"""In-process API tests: the real app and a real service (real MLX), driven over ASGI by httpx.

Real server processes are exercised in tests/e2e; these cover HTTP behaviour fast.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import httpx

from tkr_embed.api.app import create_app
from tkr_embed.engine.service import EmbeddingService


@asynccontextmanager
async def running_app(settings):
    service = EmbeddingService(settings)
    app = create_app(settings, service)
    await service.start()
    app.state.service = service
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     timeout=60) as client:
            yield client, service
    finally:
        await service.stop()


@asynccontextmanager
async def served(app):
    """An app through its real lifespan (model load, key store, pool), with an httpx client over ASGI."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     timeout=120) as client:
            yield client
