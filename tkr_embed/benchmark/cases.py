"""Benchmark workloads: what each request of a case sends (OpenAI-style /v1/embeddings bodies,
which every system in the comparison accepts).

Texts and images are unique per request (a counter is written into them), so the cache only
answers in the `cache` case, which repeats one text on purpose.
"""

from __future__ import annotations

import base64
import io
from typing import Callable

import orjson

WORDS = ("latency throughput cache batching vector search local embedding server model token image "
         "query passage retrieval agent memory index quantisation kernel").split()

TEXT_CASES = ("short", "long", "cache", "mix", "ingest")
IMAGE_CASES = ("image", "fused")
ALL_CASES = TEXT_CASES + IMAGE_CASES

SHORT_WORDS = 12    # 23-33 MiniLM tokens with the request number and specials
LONG_WORDS = 180    # 252-256 MiniLM tokens: at its 256-token window
# `ingest`: one request carries a batch of documents, as a RAG pipeline's embed_documents sends
# them: 32 texts of 4 to 190 words each (~15 to ~250 tokens), every request a different mix.
INGEST_TEXTS = 32
INGEST_WORDS = (4, 190)


def items_per_request(case: str) -> int:
    return INGEST_TEXTS if case == "ingest" else 1


# Knuth's multiplicative hash constant (a prime): spreads consecutive integers over a range.
MULTIPLICATIVE_HASH = 2654435761


def ingest_words(i: int, k: int) -> int:
    """Words in text k of ingest request i: uniform over INGEST_WORDS by a multiplicative hash."""
    lo, hi = INGEST_WORDS
    return lo + ((i * INGEST_TEXTS + k) * MULTIPLICATIVE_HASH % 2**32) % (hi - lo + 1)


# A request's number as written into its text: a multiplicative scramble of i into 12 digits, one
# to one over any 9 x 10^11 consecutive i (the prime multiplier shares no factor with 9 x 10^11). A
# number's token count depends on its digits, not their count: the raw ceiling's 10^11 + i
# ("100000000017": mostly zeros) came to ~7% fewer MiniLM tokens than the load generator's
# random 12-digit bases, and each load level's random base fixed its texts' length. Scrambled,
# every batch and every level draws its lengths from one spread (docs/benchmarks.md, "Paired rounds").
NUMBER_SPREAD = 9 * 10**11


def request_number(i: int) -> int:
    return 10**11 + (i * MULTIPLICATIVE_HASH) % NUMBER_SPREAD


def make_text(i: int, words: int) -> str:
    return f"request {request_number(i)}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))


class ImageMaker:
    """Small PNGs, each with the request number written into its pixels (so none is a cache hit)."""

    def __init__(self, side: int = 128):
        import numpy as np

        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:side, 0:side]
        base = np.stack([x * 2, y * 2, (x + y)], axis=-1) % 256
        self._base = (base + rng.integers(0, 16, base.shape)).astype("uint8")

    def png(self, i: int) -> bytes:
        from PIL import Image

        px = self._base.copy()
        px[0, :8, 0] = list((i >> (8 * k)) & 0xFF for k in range(8))
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def data_uri(self, i: int) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png(i)).decode()


def _image_part(uri: str) -> dict:
    return {"type": "image_url", "image_url": {"url": uri}}


def build_case(case: str, path: str, model: str, image_side: int = 128) -> Callable[[int], tuple[str, bytes]]:
    """request(i) -> (path, JSON body) for request number i of the case."""
    images = ImageMaker(image_side) if case in IMAGE_CASES else None

    def body(inp, many: bool = False) -> tuple[str, bytes]:
        return path, orjson.dumps({"input": inp if many else [inp], "model": model})

    def one(kind: str, i: int):
        if kind == "short":
            return body(make_text(i, SHORT_WORDS))
        if kind == "long":
            return body(make_text(i, LONG_WORDS))
        if kind == "cache":
            return body(make_text(-1, SHORT_WORDS))
        if kind == "image":
            return body([_image_part(images.data_uri(i))])
        if kind == "ingest":
            return body([make_text(i * INGEST_TEXTS + k, ingest_words(i, k)) for k in range(INGEST_TEXTS)], many=True)
        if kind == "fused":
            return body([{"type": "text", "text": make_text(i, SHORT_WORDS)}, _image_part(images.data_uri(i))])
        raise ValueError(f"unknown case {kind!r}")

    if case == "mix":
        # Six in ten short queries, two long passages, two repeats (cache hits).
        plan = ("short",) * 5 + ("long",) * 2 + ("cache",) * 2 + ("short",)
        return lambda i: one(plan[i % len(plan)], i)
    if case not in ALL_CASES:
        raise ValueError(f"unknown case {case!r}; choose from {', '.join(ALL_CASES)}")
    return lambda i: one(case, i)
