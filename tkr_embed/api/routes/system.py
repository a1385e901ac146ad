"""/health (cheap liveness), /ready (readiness), /metrics (Prometheus) and /info."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ... import __version__
from ...engine.service import EmbeddingService
from ..deps import get_service
from ..responses import FastJSONResponse, FastJSONRoute
from ..schemas import HealthResponse
from ..metrics import is_loopback
from ..security import check_permissions

# A forward pass running longer than this means a wedged worker: unready, though HTTP still answers.
# (Not a ping through the queue: a long batch under load is normal and must not flip readiness.)
WORKER_STALL_SECONDS = 120.0

router = APIRouter(tags=["system"], route_class=FastJSONRoute)


@router.get("/health", response_model=HealthResponse)
async def health(request: Request):
    """Liveness: 200 while the process serves HTTP, loading and draining included (a watchdog
    restarts on failures of this, so it must not depend on the model)."""
    state = request.app.state
    service: EmbeddingService | None = state.service
    loaded = bool(service and service.ready)
    status = "draining" if state.draining else "healthy" if loaded else "loading"
    return FastJSONResponse({"status": status, "model_loaded": loaded})


@router.get("/ready")
async def ready(request: Request):
    """Readiness: 200 only when the model is loaded and warmed up, the worker answers, and the
    server is not draining; 503 with the reason otherwise (load balancers route on this)."""
    state = request.app.state
    service: EmbeddingService | None = state.service
    reason = None
    if state.draining:
        reason = "draining"
    elif state.load_error:
        reason = f"model failed to load: {state.load_error}"
    elif service is None or not service.ready:
        reason = "loading"
    else:
        reason = service.worker.stalled(WORKER_STALL_SECONDS)
    if reason:
        return FastJSONResponse({"ready": False, "reason": reason}, status_code=503, headers={"Retry-After": "5"})
    return FastJSONResponse({"ready": True, "model": service.model_id})


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request):
    access = request.app.state.settings.security.metrics_access
    local = is_loopback(request.client.host if request.client else None)
    if access == "admin" or (access == "loopback" and not local):
        check_permissions(request, "admin")
    return Response(generate_latest(request.app.state.metrics.exposition), media_type=CONTENT_TYPE_LATEST)


async def _info_access(request: Request) -> None:
    if request.app.state.settings.security.info_requires_auth:
        check_permissions(request, any_key=True)


@router.get("/info", dependencies=[Depends(_info_access)])
async def info(service: EmbeddingService = Depends(get_service)):
    return FastJSONResponse({"version": __version__, **service.info()})
