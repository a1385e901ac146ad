import numpy as np

from tkr_embed.engine.cache import EmbeddingCache, item_key
from tkr_embed.models.base import DecodedImage, EmbedItem


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_keys_cover_everything_that_changes_the_vector():
    img_a, img_b = DecodedImage(None, "a" * 64), DecodedImage(None, "b" * 64)
    base = item_key("m|r1|none", EmbedItem(text="t"), True)
    variants = [
        item_key("m|r2|none", EmbedItem(text="t"), True),          # model revision
        item_key("m|r1|q4", EmbedItem(text="t"), True),            # quantisation
        item_key("m|r1|none", EmbedItem(text="t"), False),         # normalise flag
        item_key("m|r1|none", EmbedItem(text="t", instruction="q: "), True),
        item_key("m|r1|none", EmbedItem(text="t "), True),
        item_key("m|r1|none", EmbedItem(text="t", images=(img_a,)), True),
        item_key("m|r1|none", EmbedItem(text="t", images=(img_b,)), True),
        item_key("m|r1|none", EmbedItem(text="t", images=(img_a, img_a)), True),
        item_key("m|r1|none", EmbedItem(text="", instruction="t"), True),  # no field bleeding
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert base == item_key("m|r1|none", EmbedItem(text="t"), True)


def test_lru_bound_ttl_and_counters():
    clock = Clock()
    c = EmbeddingCache(max_size=2, ttl_seconds=10, timer=clock)
    v = np.ones(4, np.float32)
    c.put("a", v)
    c.put("b", v * 2)
    assert c.get("a") is not None  # a is now most recently used
    c.put("c", v * 3)  # evicts b
    assert c.get("b") is None and c.get("c") is not None
    clock.now = 11
    assert c.get("a") is None and c.get("c") is None  # expired
    s = c.stats()
    assert (s["hits"], s["misses"]) == (2, 3) and s["size"] == 0


def test_cached_vectors_are_read_only_copies():
    c = EmbeddingCache(10, 60)
    v = np.ones(3, np.float32)
    c.put("k", v)
    v[0] = 5
    got = c.get("k").vector
    assert got[0] == 1 and not got.flags.writeable


def test_disabled_cache_stores_nothing():
    c = EmbeddingCache(10, 60, enabled=False)
    c.put("k", np.ones(2, np.float32))
    assert c.get("k") is None and c.stats()["size"] == 0
