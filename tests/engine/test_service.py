"""EmbeddingService on real MLX (MiniLM): cross-request batching, cache, queue bound, dropped clients."""

from __future__ import annotations

import asyncio
import platform
import time

import numpy as np
import pytest

from tkr_embed.engine.batcher import QueueFull
from tkr_embed.engine.service import EmbeddingService, ModalityNotSupported
from tkr_embed.engine.shapes import bucket
from tkr_embed.models.base import EmbedItem
from tests.conftest import MINILM_SPEC
from tests.helpers import cosine, make_settings


@pytest.fixture(scope="module")
async def service():
    # The server's own MLX worker runs the batches (no replicas: tests here hold that worker);
    # tests/engine/test_replicas.py covers engine.cpu_replicas.
    s = EmbeddingService(make_settings(MINILM_SPEC, **{"engine.max_batch_items": 64, "engine.cpu_replicas": 1}))
    await s.start()
    yield s
    await s.stop()


async def test_concurrent_requests_share_forward_passes(service):
    texts = [f"concurrent request number {i} about topic {i % 7}" for i in range(32)]
    before_batches, before_items = service.batcher.batches_run, service.batcher.items_run
    results = await asyncio.gather(*(service.embed([EmbedItem(text=t)]) for t in texts))
    batches = service.batcher.batches_run - before_batches
    assert service.batcher.items_run - before_items == 32
    assert 1 <= batches < 32, f"{batches} forward passes for 32 concurrent requests"
    # and batching changed nothing: each equals its own single-item pass
    alone = await service.embed([EmbedItem(text=texts[5])], normalize=True)
    assert cosine(alone.vectors[0], results[5].vectors[0]) >= 0.9999


async def test_cache_hits_skip_the_worker(service):
    item = EmbedItem(text="cache me if you can")
    first = await service.embed([item])
    jobs = service.worker.jobs_run
    hits = service.cache.hits
    second = await service.embed([item])
    assert first.cached == [False] and second.cached == [True]
    assert service.worker.jobs_run == jobs  # never reached the worker
    assert service.cache.hits == hits + 1
    np.testing.assert_array_equal(first.vectors, second.vectors)
    assert second.token_counts == first.token_counts


async def test_cache_key_separates_instruction_and_normalisation(service):
    t = "separate keys"
    a = await service.embed([EmbedItem(text=t)], normalize=True)
    b = await service.embed([EmbedItem(text=t)], normalize=False)
    c = await service.embed([EmbedItem(text=t, instruction="Represent this query: ")])
    assert b.cached == [False] and c.cached == [False]
    assert abs(np.linalg.norm(a.vectors[0]) - 1) < 1e-5
    assert abs(np.linalg.norm(b.vectors[0]) - 1) > 1e-3  # mean pooling is not unit length
    assert cosine(a.vectors[0], b.vectors[0]) > 0.9999
    assert cosine(a.vectors[0], c.vectors[0]) < 0.999


async def test_duplicates_in_one_request_are_computed_once(service):
    items_before = service.batcher.items_run
    r = await service.embed([EmbedItem(text="dup x"), EmbedItem(text="dup x"), EmbedItem(text="dup y")])
    assert service.batcher.items_run - items_before == 2
    np.testing.assert_array_equal(r.vectors[0], r.vectors[1])


async def test_full_queue_rejects_whole_request(service):
    limit = service.batcher.max_queue_items
    service.batcher.max_queue_items = 2
    try:
        with pytest.raises(QueueFull) as e:
            await service.embed([EmbedItem(text=f"overflow {i}") for i in range(3)])
        assert e.value.retry_after >= 1
        assert service.batcher.depth == 0  # nothing half-queued
    finally:
        service.batcher.max_queue_items = limit


async def test_items_of_a_departed_client_are_dropped_before_the_forward_pass(service):
    busy = service.worker.submit(time.sleep, 0.5)  # hold the worker
    items_run, dropped = service.batcher.items_run, service.batcher.items_dropped
    first = asyncio.ensure_future(service.embed([EmbedItem(text="kept while busy")]))
    gone = asyncio.ensure_future(service.embed([EmbedItem(text="client that leaves")]))
    for _ in range(50):
        await asyncio.sleep(0.01)
        if service.batcher.depth == 2:
            break
    assert service.batcher.depth == 2  # both wait: the worker takes a batch only once it is free
    gone.cancel()
    await busy
    await first
    await asyncio.sleep(0.05)
    assert service.batcher.items_dropped == dropped + 1
    assert service.batcher.items_run == items_run + 1  # only "kept while busy" ran


async def test_images_on_a_text_model_name_the_model_and_config_key(service):
    from tkr_embed.engine.media import decode_image
    from tests.helpers import png_bytes

    img = decode_image(png_bytes(8, 8), 10**6, 10**6, ["PNG"])
    with pytest.raises(ModalityNotSupported) as e:
        await service.embed([EmbedItem(images=(img,))])
    assert "all-MiniLM-L6-v2" in str(e.value) and "model.path" in str(e.value)


async def test_semantic_ranking(service):
    r = await service.embed([EmbedItem(text=t) for t in
                             ["optimize API response time", "reduce endpoint latency", "a recipe for banana bread"]])
    v = r.vectors
    assert float(v[0] @ v[1]) > float(v[0] @ v[2])


async def test_info_reports_model_cache_batcher_and_memory(service):
    info = service.info()
    assert info["model"]["dimension"] == 384 and info["model"]["family"] == "text_encoder"
    assert info["model"]["quantization"] == "none" and info["model"]["load_seconds"] > 0
    assert info["memory"]["mlx"]["active_bytes"] > 0
    assert {"hits", "misses", "size", "hit_rate"} <= set(info["cache"])
    assert info["batcher"]["max_batch_items"] == 64
    assert info["batcher"]["max_batch_tokens"] == 4096  # config.dev.yaml's 0: the CPU backend's budget
    if platform.system() == "Linux":  # the native kernels are built there: MiniLM runs packed
        assert info["worker"]["packed_sequences"] and info["batcher"]["packed"]
        assert info["model"]["packed_sequences"]
        assert info["batcher"]["padding_efficiency"] == 1.0


async def test_shape_buckets_warm_every_batch_size_and_change_no_vector(service):
    """engine.shape_buckets=on (CUDA's default) forced on the CPU: the warm-up runs every bucketed
    batch size once, and concurrent requests get the vectors the unpadded service gives."""
    bucketed = EmbeddingService(make_settings(MINILM_SPEC, **{"engine.shape_buckets": "on",
                                                              "engine.max_batch_items": 16}))
    await bucketed.start()
    try:
        assert bucketed.info()["worker"]["shape_buckets"] is True
        assert bucketed.info()["worker"]["cpu_shards"] == 1
        # warm-up: one pass per shard count, then one per bucket up to 16 items
        assert bucketed.worker.jobs_run >= 1 + len([1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16])
        warmed = {(s["rows"], s["length"]): s["batches"] for s in bucketed.info()["worker"]["shapes"]}
        assert sorted(rows for rows, _ in warmed) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16]
        texts = [f"bucketed request {i} " + "word " * (i * 3) for i in range(11)]
        # one 11-item request: one forward pass, 12 rows padded to the longest text's length bucket
        alike = [EmbedItem(text=f"one request of alike texts, item {i}") for i in range(11)]
        longest = max(p.cost for p in bucketed._prepare_all(alike))
        await bucketed.embed(alike)
        shapes = {(s["rows"], s["length"]): s for s in bucketed.info()["worker"]["shapes"]}
        ran = shapes[(12, bucket(longest))]
        assert ran["batches"] == warmed.get((12, bucket(longest)), 0) + 1
        assert 0 < ran["build_seconds"] < ran["seconds"] and ran["cpu_seconds"] > 0
        padded = await asyncio.gather(*(bucketed.embed([EmbedItem(text=t)]) for t in texts))
        plain = await asyncio.gather(*(service.embed([EmbedItem(text=t)]) for t in texts))
        for a, b in zip(padded, plain):
            assert cosine(a.vectors[0], b.vectors[0]) >= 0.99999
            assert a.token_counts == b.token_counts  # padding is not billed
    finally:
        await bucketed.stop()
    assert service.info()["worker"]["shape_buckets"] is False  # auto on a CPU backend
    assert service.info()["worker"]["shapes"] is None


class _CountingPool:
    """The service's CPU pool, counting what is handed to it."""

    def __init__(self, pool):
        self.pool, self.handed = pool, 0

    def submit(self, fn, *args, **kwargs):
        self.handed += 1
        return self.pool.submit(fn, *args, **kwargs)


async def test_short_text_requests_are_tokenised_on_the_loop_and_the_rest_in_the_pool(service, monkeypatch):
    """engine.inline_prepare_chars: a text-only request of that many characters or fewer skips the
    pool hand-off; longer text, or the setting at 0, goes through the pool. Same vectors either way."""
    budget = service.settings.engine.inline_prepare_chars
    assert budget >= 64  # the default tokenises a short query inline
    pool = _CountingPool(service.cpu_pool)
    monkeypatch.setattr(service, "cpu_pool", pool)
    short = "inline tokenising of a short query"
    inline = await service.embed([EmbedItem(text=short)])
    assert pool.handed == 0
    over = "x" * (budget - len(short) + 1)  # one character over the budget, in two items
    await service.embed([EmbedItem(text=short + " again"), EmbedItem(text=over)])
    assert pool.handed == 1
    monkeypatch.setattr(service.settings.engine, "inline_prepare_chars", 0)
    pooled = await service.embed([EmbedItem(text=short)], normalize=False)  # normalize=False: not a cache hit
    assert pool.handed == 2
    np.testing.assert_allclose(pooled.vectors[0] / np.linalg.norm(pooled.vectors[0]), inline.vectors[0], atol=1e-6)
