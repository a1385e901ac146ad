"""Request and response bodies of the native API."""

from __future__ import annotations

from typing import Union

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextEmbedRequest(_Strict):
    texts: list[str] = Field(..., min_length=1, description="Texts to embed, one vector each.")
    model: str | None = Field(None, description="A served model's name or alias (default: the default model).")
    normalize: bool = Field(True, description="L2-normalise the vectors.")
    instruction: str | None = Field(
        None, description="Task instruction (Qwen2-VL: the system prompt; BERT: a prefix). For queries."
    )


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dimension: int
    model: str
    cached: list[bool]
    processing_time_ms: float


class MultimodalInput(_Strict):
    text: str | None = None
    image: str | None = Field(None, description="base64 image bytes, or a data:image/...;base64 URI")


SimilarityInput = Union[str, MultimodalInput]


class SimilarityRequest(_Strict):
    query: SimilarityInput
    candidates: list[SimilarityInput] = Field(..., min_length=1)
    top_k: int | None = Field(None, ge=1)
    model: str | None = Field(None, description="A served model's name or alias (default: the default model).")
    instruction: str | None = Field(None, description="Applied to the query only (as retrieval models expect).")


class SimilarityResult(BaseModel):
    index: int
    score: float


class SimilarityResponse(BaseModel):
    results: list[SimilarityResult]
    model: str
    processing_time_ms: float


class HealthResponse(BaseModel):
    status: str
    model_loaded: bool
