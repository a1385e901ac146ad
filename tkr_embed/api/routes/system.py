"""/health (cheap liveness) and /info (what is served and how it is doing)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ... import __version__
from ...engine.service import EmbeddingService
from ..deps import get_service
from ..responses import FastJSONResponse
from ..schemas import HealthResponse
from ..security import check_permissions

router = APIRouter(tags=["system"])


@router.get("/health", response_model=HealthResponse)
async def health(request: Request):
    service: EmbeddingService | None = getattr(request.app.state, "service", None)
    loaded = bool(service and service.ready)
    return FastJSONResponse({"status": "healthy" if loaded else "loading", "model_loaded": loaded},
                            status_code=200 if loaded else 503)


async def _info_access(request: Request) -> None:
    if request.app.state.settings.security.info_requires_auth:
        check_permissions(request, any_key=True)


@router.get("/info", dependencies=[Depends(_info_access)])
async def info(service: EmbeddingService = Depends(get_service)):
    return FastJSONResponse({"version": __version__, **service.info()})
