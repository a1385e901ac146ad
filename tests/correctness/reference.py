"""The transformers + torch references live in the package (the benchmark's raw torch peer uses them too)."""

from tkr_embed.benchmark.torch_reference import (  # noqa: F401
    DEFAULT_SYSTEM, Qwen2VLReference, SentenceTransformerReference, cosines, qwen2_vl_prompt,
)
