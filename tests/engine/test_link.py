"""A front end's service linked to a real engine (tiny Qwen2-VL on real MLX) over the Unix socket
of server.frontends > 1: same vectors as the engine's own service, errors and cancellations
crossing the link, the engine going away."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tkr_embed.engine.batcher import QueueFull
from tkr_embed.engine.link import EngineGone, EngineHost
from tkr_embed.engine.remote import FrontendService
from tkr_embed.engine.service import EmbeddingService
from tkr_embed.models.base import EmbedItem
from tkr_embed.engine.media import decode_image
from tests.helpers import make_settings, png_bytes


def image(seed: int):
    return decode_image(png_bytes(96, 64, seed), 10**7, 10**8, ["PNG"])


@pytest.fixture(scope="module")
async def linked(tiny_dir, tmp_path_factory):
    """(engine service, its host, a front-end service linked to it). Batches padded to bucketed
    shapes, as on CUDA, so the engine's tally of shapes has something to carry."""
    settings = make_settings(str(tiny_dir), **{"engine.max_queue_items": 6, "cache.enabled": False,
                                                "engine.shape_buckets": "on", "engine.max_batch_items": 16})
    engine = EmbeddingService(settings)
    host = EngineHost(engine)
    engine.on_batch = host.observe_batch
    await engine.start()
    path = str(tmp_path_factory.mktemp("link") / "engine.sock")
    await host.start(path)
    front = FrontendService(settings, path, index=0)
    lost = []
    front.on_engine_lost = lambda: lost.append(True)
    await front.start()
    front.lost = lost
    yield engine, host, front
    await front.stop()
    await host.stop()
    await engine.stop()


async def test_frontend_embeds_what_the_engine_embeds(linked):
    engine, host, front = linked
    items = [EmbedItem(text="a query about local embeddings"), EmbedItem(images=(image(1),)),
             EmbedItem(text="a caption", images=(image(2),)), EmbedItem(text="x", instruction="Retrieve passages.")]
    remote, local = await front.embed(items), await engine.embed(items)
    np.testing.assert_allclose(remote.vectors, local.vectors, atol=1e-6)
    assert remote.token_counts == local.token_counts and remote.vectors.shape == (4, front.dimension)
    assert front.model_id == engine.model_id and front.modalities == engine.modalities
    # The engine's figures reach the front end with the next stats answer (each second).
    await asyncio.sleep(1.3)
    info = front.info()
    assert info["frontends"]["linked"] == 1 and info["batcher"]["items_run"] >= 4
    assert front.counters()["items_by_modality"]["image+text"] == 1  # summed by the engine
    assert sum(front.batch_sizes().values()) == engine.batcher.batches_run
    assert info["worker"]["shapes"] == engine.shape_times() and sum(s["batches"] for s in engine.shape_times()) > 2
    assert front.worker.stalled(120) is None


async def test_queue_full_crosses_the_link_as_queue_full(linked):
    engine, _, front = linked
    items = [EmbedItem(text=f"item {i}") for i in range(7)]  # the engine queues at most 6
    with pytest.raises(QueueFull) as e:
        await front.embed(items)
    assert e.value.retry_after == engine.settings.engine.retry_after_seconds and e.value.limit == 6


async def test_a_cancelled_request_is_dropped_before_its_forward_pass(linked):
    engine, _, front = linked
    prepared = [front.loaded.embedder.prepare(EmbedItem(text=f"never computed {i}")) for i in range(3)]
    dropped, items_run = engine.batcher.items_dropped, engine.batcher.items_run
    futures = front.batcher.submit(prepared)
    for f in futures:  # as the service does when the client goes away; same turn as the submit
        f.cancel()
    await asyncio.sleep(0.3)
    ok = await front.embed([EmbedItem(text="still served")])  # and the link still works
    assert ok.vectors.shape == (1, front.dimension)
    assert engine.batcher.items_dropped - dropped == 3
    assert engine.batcher.items_run - items_run == 1


async def test_requests_fail_cleanly_when_the_engine_goes_away(linked):
    engine, host, front = linked
    prepared = [front.loaded.embedder.prepare(EmbedItem(text="in flight"))]
    futures = front.batcher.submit(prepared)
    await host.stop()  # what the front end sees when the engine process dies
    with pytest.raises(EngineGone):
        await asyncio.gather(*futures)
    await asyncio.sleep(0)
    assert front.lost == [True]  # the front-end process leaves (serving.py)
    assert "not reachable" in front.worker.stalled(120)
    with pytest.raises(EngineGone):
        front.batcher.submit(prepared)
