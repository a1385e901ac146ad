"""OpenAI-compatible API: POST /v1/embeddings, GET /v1/models[/{id}].

A drop-in for the OpenAI SDKs, LangChain, LlamaIndex and LiteLLM. `input` may be a string, a list
of strings, token ids (list[int] or list[list[int]], decoded with the model's tokenizer), or
multimodal items: a list of content parts ({"type": "text"} / {"type": "image_url"}) that becomes
one fused vector (the shape vLLM and Cohere use). Errors use OpenAI's shape (see errors.envelope).
Everything goes through the same auth, limits, cache and batcher as the native API.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from ...engine.media import ImageError
from ...engine.service import EmbeddingService
from ...models.base import EmbedItem
from ..deps import (checked_json_body, check_text, count_items, decode_images, get_service, require_images,
                    run_embedding, service_for)
from ..errors import APIError
from ..responses import FastJSONResponse, FastJSONRoute, json_body_docs
from ..security import check_permissions, principal_of, require

router = APIRouter(prefix="/v1", tags=["openai"], route_class=FastJSONRoute)

MAX_INPUTS = 2048


class EmbeddingsRequest(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do (clients add their own).
    model_config = ConfigDict(extra="ignore")
    input: Any = Field(..., description="string, list of strings, token ids, or lists of content parts")
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = Field(None, max_length=256)
    truncate: bool = Field(True, description="cut inputs over the model's token limit (false: refuse them)")


def _is_token_list(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


class _Parsed:
    """One input before images are decoded: text and/or image sources (data: URIs or URLs)."""

    def __init__(self, text: str | None = None, images: list[tuple[str, str]] | None = None,
                 token_ids: list[int] | None = None):
        self.text = text
        self.images = images or []
        self.token_ids = token_ids


def parse_input(raw: Any) -> list[_Parsed]:
    if isinstance(raw, str):
        raw = [raw]
    elif _is_token_list(raw):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "invalid_input", "'input' must be a non-empty string, list of strings, "
                       "list of token ids, or list of content-part lists", "input")
    if len(raw) > MAX_INPUTS:
        raise APIError(400, "too_many_inputs", f"'input' has {len(raw)} items; at most {MAX_INPUTS}", "input")
    out = []
    for i, item in enumerate(raw):
        param = f"input[{i}]"
        if isinstance(item, str):
            if not item.strip():
                raise APIError(400, "invalid_input", f"{param} is empty", param)
            out.append(_Parsed(text=item))
        elif _is_token_list(item):
            out.append(_Parsed(token_ids=item))
        elif isinstance(item, list) and item and all(isinstance(p, dict) for p in item):
            out.append(_parse_parts(item, param))
        elif isinstance(item, dict):
            out.append(_parse_parts([item], param))
        else:
            raise APIError(400, "invalid_input", f"{param} must be a non-empty string, a list of token ids, "
                           "or a list of content parts", param)
    return out


def _parse_parts(parts: list[dict], param: str) -> _Parsed:
    texts, images = [], []
    for j, part in enumerate(parts):
        p = f"{param}[{j}]"
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"].strip():
                texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise APIError(400, "invalid_input", f"{p}.image_url needs a 'url'", p)
            images.append((f"{p}.image_url", url))
        else:
            raise APIError(400, "invalid_input", f"{p}: content parts are {{\"type\": \"text\", \"text\": ...}} "
                           "or {\"type\": \"image_url\", \"image_url\": {\"url\": ...}}", p)
    if not texts and not images:
        raise APIError(400, "invalid_input", f"{param} has no text and no image", param)
    return _Parsed(text=" ".join(texts) if texts else None, images=images)


async def _image_sources(request: Request, parsed: list[_Parsed]) -> list[tuple[str, bytes | str]]:
    """data: URIs stay strings (decode_images base64-decodes them in the CPU pool, off the event
    loop); http(s) URLs are fetched here (async I/O)."""
    out: list[tuple[str, bytes | str]] = []
    for p in parsed:
        for param, url in p.images:
            if url.startswith("data:"):
                out.append((param, url))
                continue
            try:
                out.append((param, await request.app.state.image_fetcher.fetch(url, param)))
            except ImageError as e:
                raise APIError(e.status, e.code, str(e), param) from None
    return out


def encode_vector(vec: np.ndarray, fmt: str):
    if fmt == "base64":
        return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode("ascii")
    return vec


@router.post("/embeddings", openapi_extra=json_body_docs(EmbeddingsRequest))
async def create_embeddings(request: Request):
    body = await checked_json_body(request, EmbeddingsRequest, any_key=True)
    service = await service_for(request, body.model)  # the model pool: by name or alias
    if body.dimensions is not None and not 1 <= body.dimensions <= service.dimension:
        raise APIError(400, "invalid_dimensions", f"'dimensions' must be between 1 and {service.dimension} "
                       f"for {service.model_id}, got {body.dimensions}", "dimensions")
    parsed = parse_input(body.input)
    # Permissions follow the content: text needs embed:text, any image needs embed:image.
    has_images = any(p.images for p in parsed)
    has_text = any(p.text is not None or p.token_ids is not None for p in parsed)
    check_permissions(request, *(["embed:text"] if has_text else []), *(["embed:image"] if has_images else []))
    if has_images:
        require_images(service)

    items: list[EmbedItem] = []
    given_tokens: dict[int, int] = {}
    images = iter(await decode_images(service, await _image_sources(request, parsed)))
    for i, p in enumerate(parsed):
        if p.token_ids is not None:
            try:
                text = service.decode_tokens(p.token_ids)
            except ValueError as e:
                raise APIError(400, "invalid_input", f"input[{i}]: {e}", f"input[{i}]") from None
            given_tokens[i] = len(p.token_ids)
            items.append(EmbedItem(text=text))
            continue
        if p.text is not None:
            check_text(p.text, service, f"input[{i}]")
        items.append(EmbedItem(text=p.text, images=tuple(next(images) for _ in p.images)))
    count_items(request, len(items))
    result = await run_embedding(request, lambda: service.embed(items, normalize=True, truncate=body.truncate))

    vectors = result.vectors
    if body.dimensions is not None and body.dimensions < vectors.shape[1]:
        vectors = vectors[:, : body.dimensions]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    tokens = [given_tokens.get(i, n) for i, n in enumerate(result.token_counts)]
    if body.user:
        request.app.state.stats.record_user(principal_of(request).key_id, body.user, len(items))
    total = int(sum(tokens))
    return FastJSONResponse({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode_vector(vectors[i], body.encoding_format)}
                 for i in range(len(items))],
        "model": service.model_id,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    })


def _model_card(request: Request, name: str, default: EmbeddingService) -> dict:
    """Loaded models describe themselves fully; one not loaded yet (loads on first use) by name."""
    entry = request.app.state.pool.entry(name)
    card = {"id": name, "object": "model", "created": int(default.started_at), "owned_by": "tkr-embed"}
    s = entry.service
    if s is not None and s.ready:
        card.update(root=s.model_id, dimension=s.dimension, modalities=sorted(s.modalities),
                    max_tokens=s.loaded.embedder.max_tokens)
    else:
        card.update(root=entry.label, loaded=False)
    return card


@router.get("/models", dependencies=[Depends(require(any_key=True))])
async def list_models(request: Request, service: EmbeddingService = Depends(get_service)):
    names = request.app.state.pool.served_names()
    return FastJSONResponse({"object": "list", "data": [_model_card(request, n, service) for n in names]})


@router.get("/models/{model_id:path}", dependencies=[Depends(require(any_key=True))])
async def get_model(model_id: str, request: Request, service: EmbeddingService = Depends(get_service)):
    if model_id not in request.app.state.pool.served_names():
        await service_for(request, model_id)  # the 404 with the served names
    return FastJSONResponse(_model_card(request, model_id, service))
