"""/similarity: rank candidates against a query by cosine, through the same cache and batcher."""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Depends, Request

from ...engine.service import EmbeddingService
from ...models.base import EmbedItem
from ..deps import (check_item_count, check_text, count_items, decode_images, require_content_type,
                    require_images, run_embedding, service_for)
from ..errors import APIError
from ..responses import FastJSONResponse, FastJSONRoute
from ..security import check_permissions, require
from ..schemas import SimilarityInput, SimilarityRequest, SimilarityResponse

router = APIRouter(tags=["similarity"], route_class=FastJSONRoute)


async def _to_items(request: Request, service: EmbeddingService, inputs: list[tuple[str, SimilarityInput]],
                    query_instruction: str | None) -> list[EmbedItem]:
    texts: list[tuple[str, str | None]] = []
    blobs: list[tuple[str, str]] = []
    for param, value in inputs:
        if isinstance(value, str):
            texts.append((param, value))
            continue
        if value.text is None and value.image is None:
            raise APIError(400, "invalid_request", f"{param} needs 'text', 'image', or both", param)
        texts.append((param, value.text))
        if value.image is not None:
            blobs.append((f"{param}.image", value.image))
    for param, text in texts:
        if text is not None:
            check_text(text, service, param)
    if blobs:
        require_images(service)
        check_permissions(request, "embed:image")  # comparing images also needs the image permission
    images = iter(await decode_images(service, blobs)) if blobs else iter(())
    items = []
    for i, (param, value) in enumerate(inputs):
        instruction = query_instruction if i == 0 else None
        if isinstance(value, str):
            items.append(EmbedItem(text=value, instruction=instruction))
        else:
            imgs = (next(images),) if value.image is not None else ()
            items.append(EmbedItem(text=value.text, images=imgs, instruction=instruction))
    return items


@router.post("/similarity", response_model=SimilarityResponse,
             dependencies=[Depends(require("similarity")), Depends(require_content_type("application/json"))])
async def similarity(body: SimilarityRequest, request: Request):
    started = time.perf_counter()
    service = await service_for(request, body.model)  # None: the default model
    check_item_count(len(body.candidates) + 1, service, "candidates")
    inputs = [("query", body.query)] + [(f"candidates[{i}]", c) for i, c in enumerate(body.candidates)]
    items = await _to_items(request, service, inputs, body.instruction)
    count_items(request, len(items))
    result = await run_embedding(request, lambda: service.embed(items, normalize=True))
    scores = result.vectors[1:] @ result.vectors[0]
    order = np.argsort(-scores, kind="stable")
    if body.top_k is not None:
        order = order[: body.top_k]
    return FastJSONResponse({
        "results": [{"index": int(i), "score": float(scores[i])} for i in order],
        "model": service.model_id,
        "processing_time_ms": round((time.perf_counter() - started) * 1000, 3),
    })
