"""Admin API (admin permission): key management, stats, effective configuration."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from ...auth.keys import PERMISSIONS
from ...auth.store import UNSET, KeyNotFound, KeyStore
from ...engine.pool import ModelBusy, OverBudget, UnknownModel
from ...models.registry import ModelLoadError
from ..errors import APIError
from ..responses import FastJSONResponse, FastJSONRoute
from ..security import require

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require("admin"))], route_class=FastJSONRoute)


class RateLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    per_minute: int | None = Field(None, ge=1)
    per_hour: int | None = Field(None, ge=1)
    per_day: int | None = Field(None, ge=1)
    burst: int | None = Field(None, ge=1)


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=200)
    permissions: list[str] = Field(..., min_length=1, description=f"any of {', '.join(PERMISSIONS)}")
    expires_in_days: float | None = Field(None, gt=0, le=36500)
    rate_limits: RateLimits | None = None


class UpdateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=200)
    permissions: list[str] | None = Field(None, min_length=1)
    expires_in_days: float | None = Field(None, gt=0, le=36500, description="null: never expires")
    rate_limits: RateLimits | None = Field(None, description="null: the server defaults")


def _store(request: Request) -> KeyStore:
    store = request.app.state.key_store
    if store is None:
        raise APIError(404, "not_found", "API keys are disabled (security.require_api_key is false)")
    return store


async def _call(fn, *args, **kwargs) -> Any:
    """Store calls are blocking database work: off the event loop; store errors -> HTTP."""
    try:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
    except KeyNotFound as e:
        raise APIError(404, "not_found", f"no API key with id '{e.args[0]}'", "id") from None
    except ValueError as e:
        raise APIError(400, "invalid_request", str(e)) from None


def _limits(body_limits: RateLimits | None) -> dict | None:
    return body_limits.model_dump(exclude_none=True) if body_limits else None


@router.post("/api-keys", status_code=201)
async def create_key(body: CreateKey, request: Request):
    store = _store(request)
    record, token = await _call(store.create, body.name, body.permissions, body.expires_in_days, _limits(body.rate_limits))
    return FastJSONResponse({**record.public(), "key": token,
                             "note": "store this key now: it is shown only once"}, status_code=201)


@router.get("/api-keys")
async def list_keys(request: Request):
    store = _store(request)
    await _call(store.flush_usage)
    return FastJSONResponse({"data": [r.public() for r in await _call(store.list)]})


@router.get("/api-keys/{key_id}")
async def get_key(key_id: str, request: Request):
    store = _store(request)
    await _call(store.flush_usage)
    return FastJSONResponse((await _call(store.get, key_id)).public())


@router.patch("/api-keys/{key_id}")
async def update_key(key_id: str, body: UpdateKey, request: Request):
    store = _store(request)
    sent = body.model_fields_set
    record = await _call(
        store.update, key_id, name=body.name, permissions=body.permissions,
        expires_in_days=body.expires_in_days if "expires_in_days" in sent else UNSET,
        rate_limits=_limits(body.rate_limits) if "rate_limits" in sent else UNSET)
    return FastJSONResponse(record.public())


@router.delete("/api-keys/{key_id}")
async def revoke_key(key_id: str, request: Request):
    store = _store(request)
    return FastJSONResponse((await _call(store.revoke, key_id)).public())


@router.post("/api-keys/{key_id}/rotate")
async def rotate_key(key_id: str, request: Request):
    store = _store(request)
    record, token = await _call(store.rotate, key_id)
    return FastJSONResponse({**record.public(), "key": token, "note": "the previous secret no longer works"})


@router.get("/stats")
async def stats(request: Request):
    app = request.app
    body: dict[str, Any] = {"requests": app.state.stats.snapshot()}
    service = app.state.service
    if service is not None and service.ready:
        info = service.info()
        body["cache"] = info["cache"]
        body["queue"] = {"depth": info["batcher"]["queue_depth"], **info["batcher"]}
        body["worker"] = info["worker"]
    store = app.state.key_store
    if store is not None:
        await _call(store.flush_usage)
        body["keys"] = [{"id": r.id, "name": r.name, "status": r.status(), **r.public()["usage"],
                         "last_used_at": r.public()["last_used_at"]} for r in await _call(store.list)]
    return FastJSONResponse(body)


@router.get("/config")
async def config(request: Request):
    # SecretStr fields dump as '**********': the key, server secret and URLs with passwords.
    return FastJSONResponse(request.app.state.settings.model_dump(mode="json"))


# ---- the model pool --------------------------------------------------------------------------
class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, description="a configured model's name or alias")


@router.get("/models")
async def list_pool(request: Request):
    return FastJSONResponse(request.app.state.pool.describe())


@contextmanager
def _pool_errors(request: Request, name: str):
    """Model-pool failures -> HTTP, for the load and unload routes."""
    try:
        yield
    except UnknownModel:
        raise APIError(404, "model_not_found", f"no configured model is called '{name}' (configured: "
                       f"{', '.join(request.app.state.pool.served_names())})", "model") from None
    except (OverBudget, ModelBusy) as e:
        raise APIError(409, "over_budget" if isinstance(e, OverBudget) else "model_busy", str(e), "model") from None
    except ModelLoadError as e:
        raise APIError(503, "model_unavailable", f"'{name}' could not be loaded: {e}", "model") from None


@router.post("/models/load")
async def load_model(body: ModelRef, request: Request):
    with _pool_errors(request, body.model):
        entry = await request.app.state.pool.load(body.model)
    return FastJSONResponse({"loaded": entry.label, **request.app.state.pool.describe()})


@router.post("/models/unload")
async def unload_model(body: ModelRef, request: Request):
    with _pool_errors(request, body.model):
        entry = await request.app.state.pool.unload(body.model)
    return FastJSONResponse({"unloaded": entry.label, **request.app.state.pool.describe()})
