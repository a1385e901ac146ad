"""Per-item embedding cache: cachetools TTL+LRU of float32 vectors.

Keys are sha256 digests over everything that decides the vector: model id and revision,
quantisation, the instruction, the normalise flag, the text and each image's decoded-pixel digest.
Hits never reach the batcher or the worker.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import NamedTuple

import numpy as np
from cachetools import TTLCache

from ..models.base import EmbedItem


class CachedEmbedding(NamedTuple):
    vector: np.ndarray
    tokens: int  # what the item cost when it was computed (usage is reported for hits too)
    full_tokens: int  # what it would have needed untruncated (> tokens: it was truncated)


def item_key(model_key: str, item: EmbedItem, normalize: bool) -> str:
    h = hashlib.sha256()
    h.update(model_key.encode())
    for part in (
        "instr", item.instruction,
        "text", item.text,
        "norm", "1" if normalize else "0",
    ):
        h.update(b"\x00" + (b"\x01" if part is None else str(part).encode()))
    for img in item.images:
        h.update(b"\x00img" + img.digest.encode())
    return h.hexdigest()


class EmbeddingCache:
    def __init__(self, max_size: int, ttl_seconds: float, enabled: bool = True, timer=time.monotonic):
        self.enabled = enabled
        self.max_size = max_size
        self.ttl_seconds = ttl_seconds
        self._data: TTLCache = TTLCache(maxsize=max_size, ttl=ttl_seconds, timer=timer)
        self._lock = threading.Lock()  # TTLCache is not thread-safe; /info may read from elsewhere
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> CachedEmbedding | None:
        if not self.enabled:
            return None
        with self._lock:
            hit = self._data.get(key)
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1
        return hit

    def put(self, key: str, vector: np.ndarray, tokens: int = 0, full_tokens: int = 0) -> None:
        if not self.enabled:
            return
        vec = np.array(vector, dtype=np.float32, copy=True)
        vec.setflags(write=False)  # shared between responses: never mutated in place
        with self._lock:
            self._data[key] = CachedEmbedding(vec, tokens, max(tokens, full_tokens))

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def stats(self) -> dict:
        with self._lock:
            size = len(self._data)
        total = self.hits + self.misses
        return {
            "enabled": self.enabled,
            "size": size,
            "max_size": self.max_size,
            "ttl_seconds": self.ttl_seconds,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / total, 4) if total else 0.0,
        }
