"""Native embedding routes: /embed/text, /embed/image, /embed/multimodal."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from ...engine.service import EmbeddingService, EmbedResult
from ...models.base import EmbedItem
from ..deps import (check_item_count, checked_json_body, check_text, count_items, decode_images, read_upload,
                    require_content_type, require_images, run_embedding, service_for)
from ..responses import FastJSONResponse, FastJSONRoute, json_body_docs
from ..security import require
from ..schemas import EmbedResponse, TextEmbedRequest

router = APIRouter(tags=["embeddings"], route_class=FastJSONRoute)


def _respond(service: EmbeddingService, result: EmbedResult, started: float) -> FastJSONResponse:
    return FastJSONResponse({
        "embeddings": result.vectors,
        "dimension": service.dimension,
        "model": service.model_id,
        "cached": result.cached,
        "processing_time_ms": round((time.perf_counter() - started) * 1000, 3),
    })


@router.post("/embed/text", response_model=EmbedResponse, openapi_extra=json_body_docs(TextEmbedRequest))
async def embed_text(request: Request):
    started = time.perf_counter()
    body = await checked_json_body(request, TextEmbedRequest, "embed:text")
    service = await service_for(request, body.model)  # None: the default model
    check_item_count(len(body.texts), service, "texts")
    for i, text in enumerate(body.texts):
        check_text(text, service, f"texts[{i}]")
    items = [EmbedItem(text=t, instruction=body.instruction) for t in body.texts]
    count_items(request, len(items))
    result = await run_embedding(request, lambda: service.embed(items, body.normalize))
    return _respond(service, result, started)


@router.post("/embed/image", response_model=EmbedResponse,
             dependencies=[Depends(require("embed:image")), Depends(require_content_type("multipart/form-data"))])
async def embed_image(request: Request,
                      file: list[UploadFile] = File(..., description="One or more images (repeat the part)."),
                      normalize: bool = Form(True), instruction: str | None = Form(None),
                      model: str | None = Form(None, description="a served model's name or alias")):
    started = time.perf_counter()
    service = await service_for(request, model)  # None: the default model
    require_images(service)
    lim = service.settings.limits
    check_item_count(len(file), service, "file")
    blobs = [(f"file[{i}]", await read_upload(f, lim.max_image_bytes, f"file[{i}]")) for i, f in enumerate(file)]
    images = await decode_images(service, blobs)
    items = [EmbedItem(images=(img,), instruction=instruction) for img in images]
    count_items(request, len(items))
    result = await run_embedding(request, lambda: service.embed(items, normalize))
    return _respond(service, result, started)


@router.post("/embed/multimodal", response_model=EmbedResponse,
             dependencies=[Depends(require("embed:multimodal")),
                           Depends(require_content_type("multipart/form-data"))])
async def embed_multimodal(request: Request,
                           text: str = Form(..., description="Text fused with the image(s)."),
                           image: list[UploadFile] = File(..., description="One or more images, fused."),
                           instruction: str | None = Form(None), normalize: bool = Form(True),
                           model: str | None = Form(None, description="a served model's name or alias")):
    started = time.perf_counter()
    service = await service_for(request, model)  # None: the default model
    require_images(service)
    lim = service.settings.limits
    check_text(text, service, "text")
    check_item_count(len(image), service, "image")
    blobs = [(f"image[{i}]" if len(image) > 1 else "image",
              await read_upload(f, lim.max_image_bytes, "image")) for i, f in enumerate(image)]
    images = await decode_images(service, blobs)
    items = [EmbedItem(text=text, images=tuple(images), instruction=instruction)]
    count_items(request, 1)
    result = await run_embedding(request, lambda: service.embed(items, normalize))
    return _respond(service, result, started)
