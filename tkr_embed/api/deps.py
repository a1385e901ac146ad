"""What the routes share: the service handle, content-type checks, image intake, and running an
embedding call so that domain errors become clear 4xx/503 answers and a client that disconnects
stops its queued work."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Sequence, TypeVar

from fastapi import Request, UploadFile
from pydantic import BaseModel

from ..engine.batcher import QueueFull
from ..engine.media import ImageError, decode_base64_image, decode_image
from ..engine.pool import OverBudget, UnknownModel
from ..engine.service import EmbeddingService, ModalityNotSupported, ModelUnloaded, TooManyTokens
from ..models.base import DecodedImage, UnsupportedInput
from ..models.qwen2_vl import InputTooLong
from ..models.qwen2_vl_image import ImageShapeError
from ..models.registry import ModelLoadError
from .errors import APIError
from .responses import read_json_body
from .security import check_permissions

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


async def get_service(request: Request) -> EmbeddingService:  # async: no thread-pool hop (security.require)
    service: EmbeddingService | None = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise APIError(503, "service_unavailable", "the model is not loaded yet", headers={"Retry-After": "5"})
    return service


async def service_for(request: Request, name: str | None, param: str = "model") -> EmbeddingService:
    """The service of the model a request names (None: the default), loaded on first use."""
    pool = request.app.state.pool
    try:
        if name is None or pool.entry(name) is pool.entries[0]:
            return await get_service(request)
        return await pool.get(name)
    except UnknownModel:
        raise APIError(404, "model_not_found", f"the model '{name}' is not served here; served: "
                       f"{', '.join(pool.served_names())}", param) from None
    except OverBudget as e:
        raise APIError(503, "model_unavailable", str(e), param, headers={"Retry-After": "10"}) from None
    except ModelLoadError as e:
        raise APIError(503, "model_unavailable", f"the model '{name}' could not be loaded: {e}", param) from None


def check_content_type(request: Request, *accepted: str) -> None:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in accepted:
        raise APIError(415, "unsupported_media_type",
                       f"Content-Type must be {' or '.join(accepted)}, got '{ctype or 'none'}'")


async def checked_json_body(request: Request, model: type[M], *permissions: str, any_key: bool = False) -> M:
    """For the hot JSON routes: what `Depends(require(...))`, `Depends(require_content_type(
    "application/json"))` and a body parameter did, in their order (401/403, then 415, then the
    body's 400s), without FastAPI's dependency solving (responses.py says why)."""
    check_permissions(request, *permissions, any_key=any_key)
    check_content_type(request, "application/json")
    return await read_json_body(request, model)


def require_content_type(*accepted: str) -> Callable[[Request], Awaitable[None]]:
    """Route dependency: check_content_type."""
    async def check(request: Request) -> None:
        check_content_type(request, *accepted)
    return check


def count_items(request: Request, n: int) -> None:
    """Items this request embeds, for the caller's usage counters and /admin/stats."""
    principal = request.scope.get("state", {}).get("principal")
    if principal is not None:
        principal.items = n


def require_images(service: EmbeddingService) -> None:
    """Fail fast, before any image is read or decoded, when the model is text-only."""
    try:
        service.require_images()
    except ModalityNotSupported as e:
        raise APIError(400, "unsupported_modality", str(e)) from None


async def read_upload(upload: UploadFile, max_bytes: int, param: str) -> bytes:
    """Read at most max_bytes (+1 to detect overflow) without trusting the part's headers."""
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise APIError(413, "request_too_large",
                       f"{param} is larger than the limit of {max_bytes} bytes (limits.max_image_bytes)", param)
    return data


async def decode_images(service: EmbeddingService, blobs: Sequence[tuple[str, bytes | str]]) -> list[DecodedImage]:
    """(param, raw bytes or base64 string) -> validated images, decoded in the CPU pool."""
    if not blobs:  # text-only requests: no thread hop
        return []
    lim = service.settings.limits

    def work() -> list[DecodedImage]:
        out = []
        for param, blob in blobs:
            try:
                data = decode_base64_image(blob, lim.max_image_bytes) if isinstance(blob, str) else blob
                out.append(decode_image(data, lim.max_image_bytes, lim.max_image_pixels, lim.allowed_image_formats))
            except ImageError as e:
                raise APIError(e.status, e.code, f"{param}: {e}", param) from None
        return out

    return await asyncio.get_running_loop().run_in_executor(service.cpu_pool, work)


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone away. The body is read by now, so the server's receive()
    blocks until the connection drops (or the response completes, when nobody is waiting)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_embedding(request: Request, call: Callable[[], Awaitable[T]]) -> T:
    """Run an embedding call; cancel it if the client disconnects; map engine errors to HTTP.

    The call runs in the request's own task. A watcher waits for the disconnect and cancels that
    task, started only once the call has had to wait (the next turn of the loop): a cache hit
    answers without one. Measured per cache hit on the loop (bench/request_path.py, ad hoc A/B):
    the call in a second task beside the watcher, under asyncio.wait, 210-225 us; a watcher
    created and cancelled before it ever ran, 245-265 us, because each such task left garbage
    for the cycle collector (80 collections per 1,000 requests); this, 148-157 us. Polling
    is_disconnected() on a timer cost more than the request itself with 64 clients waiting."""
    request_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    watcher: asyncio.Task | None = None
    client_left = False

    async def cancel_on_disconnect() -> None:
        nonlocal client_left
        await wait_for_disconnect(request)
        client_left = True
        request_task.cancel()  # the call's queued items are dropped before their forward pass

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(cancel_on_disconnect())

    watch_soon = loop.call_soon(start_watching)  # runs only if the call waits
    try:
        return await call()
    except asyncio.CancelledError:
        if not client_left:
            raise  # the server is stopping
        if hasattr(request_task, "uncancel"):  # Python 3.11+ counts cancellations: this one is handled
            request_task.uncancel()
        raise APIError(499, "client_closed_request", "client disconnected") from None
    except QueueFull as e:
        raise APIError(503, "overloaded", str(e), headers={"Retry-After": str(e.retry_after)}) from None
    except ModalityNotSupported as e:
        raise APIError(400, "unsupported_modality", str(e)) from None
    except InputTooLong as e:
        raise APIError(400, "input_too_long", str(e)) from None
    except TooManyTokens as e:
        raise APIError(400, "input_too_long", str(e), f"input[{e.offenders[0][0]}]") from None
    except ImageShapeError as e:
        raise APIError(400, "invalid_image", str(e)) from None
    except UnsupportedInput as e:
        raise APIError(400, "invalid_request", str(e)) from None
    except ModelUnloaded as e:
        raise APIError(503, "model_unavailable", str(e), headers={"Retry-After": "1"}) from None
    finally:
        watch_soon.cancel()
        if watcher is not None:
            watcher.cancel()


def check_item_count(n: int, service: EmbeddingService, param: str) -> None:
    limit = service.settings.limits.max_items_per_request
    if n > limit:
        raise APIError(400, "too_many_items",
                       f"{param} has {n} items; the limit is {limit} (limits.max_items_per_request)", param)


def check_text(text: str, service: EmbeddingService, param: str) -> None:
    """Non-empty and under the character limit; `param` names the field in the error."""
    if not text.strip():
        raise APIError(400, "invalid_request", f"{param} is empty", param)
    limit = service.settings.limits.max_text_chars
    if len(text) > limit:
        raise APIError(413, "request_too_large",
                       f"{param} has {len(text)} characters; the limit is {limit} (limits.max_text_chars)", param)
