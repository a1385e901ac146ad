"""Batches overlapping on the device (engine.pipeline_depth): the worker launches a batch and
collects it later, the batcher hands over a second batch only when it is worth it. Real MLX
(MiniLM, the tiny Qwen2-VL with images) for the worker; the batcher's rule on plain items."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from tkr_embed.engine.batcher import Batcher
from tkr_embed.engine.service import EmbeddingService
from tkr_embed.engine.shapes import ShapeBuckets, resolve_pipeline_depth
from tkr_embed.engine.shards import ShardedForward
from tkr_embed.engine.worker import MLXWorker
from tkr_embed.models.base import EmbedItem
from tkr_embed.models.registry import load_embedder, resolve_model_dir

from tests.conftest import MINILM_SPEC
from tests.helpers import cosine, forward_each_alone, make_settings, mixed_multimodal_items


def test_auto_depth_is_two_on_cuda_only():
    assert resolve_pipeline_depth(0, on_cpu=False, cuda=True) == 2
    assert resolve_pipeline_depth(0, on_cpu=False, cuda=False) == 1  # Metal: unmeasured
    assert resolve_pipeline_depth(0, on_cpu=True, cuda=True) == 1  # the CPU device of a CUDA build
    assert resolve_pipeline_depth(3, on_cpu=True, cuda=False) == 3


# ---- the worker: launch, collect later, in order --------------------------------------------

@pytest.fixture(scope="module")
def deep_worker(tiny_dir):
    """A worker that keeps up to two batches on the device, with MiniLM and the tiny Qwen2-VL."""
    w = MLXWorker(pipeline_depth=2)
    w.start()
    minilm = w.call(load_embedder, resolve_model_dir(MINILM_SPEC), "none").embedder
    tiny = w.call(load_embedder, resolve_model_dir(str(tiny_dir)), "none").embedder
    yield w, minilm, tiny
    w.stop()


async def _launch_while_busy(worker, jobs):
    """Queue every launch while the worker is held, so they wait together (as batches do under
    load), then let it go: the futures, in the order given."""
    gate = threading.Event()
    held = worker.submit(gate.wait)
    futures = [worker.submit_launch(fn, *args) for fn, *args in jobs]
    gate.set()
    await held
    return await asyncio.gather(*futures, return_exceptions=True)


async def test_overlapped_batches_give_each_items_own_vector(deep_worker):
    worker, minilm, tiny = deep_worker
    forward = ShardedForward(1, ShapeBuckets(16), pipeline_depth=2)
    texts = [[f"batch {b} text {i} " + "word " * (3 * i + b) for i in range(5 + b)] for b in range(3)]
    text_batches = [[minilm.prepare(EmbedItem(text=t)) for t in batch] for batch in texts]
    mm = [tiny.prepare(it) for it in mixed_multimodal_items()]
    before = worker.overlapped
    results = await _launch_while_busy(worker, [(forward.launch, minilm, b) for b in text_batches]
                                       + [(forward.launch, tiny, mm)])
    # launched back to back: each of the last three went out while the one before was on the device
    assert worker.overlapped - before == 3
    for got, batch in zip(results, text_batches):
        want = forward_each_alone(worker, minilm, batch)
        assert got.shape == want.shape  # padding rows (bucket 6 -> 6, 7 -> 8) dropped
        for a, b in zip(got, want):
            assert cosine(a, b) >= 0.99999
    want = forward_each_alone(worker, tiny, mm)
    for a, b in zip(results[-1], want):
        assert cosine(a, b) >= 0.9999


class _Fails:
    shape = None

    def collect(self):
        raise RuntimeError("the device lost this batch")


async def test_a_failed_launch_or_collect_fails_only_its_own_batch(deep_worker):
    worker, minilm, _ = deep_worker
    forward = ShardedForward(1, None, pipeline_depth=2)
    batch = [minilm.prepare(EmbedItem(text="a healthy neighbour"))]

    def bad_launch():
        raise ValueError("could not build this graph")

    results = await _launch_while_busy(worker, [(forward.launch, minilm, batch), (bad_launch,),
                                                (lambda: _Fails(),), (forward.launch, minilm, batch)])
    assert isinstance(results[1], ValueError) and isinstance(results[2], RuntimeError)
    assert cosine(results[0][0], results[3][0]) >= 0.99999
    # and the worker keeps serving
    again = await worker.submit_launch(forward.launch, minilm, batch)
    assert cosine(again[0], results[0][0]) >= 0.99999


async def test_depth_one_collects_each_batch_before_the_next(worker, minilm):
    forward = ShardedForward(1, ShapeBuckets(16))
    batches = [[minilm.prepare(EmbedItem(text=f"serial {b} {i}")) for i in range(3)] for b in range(3)]
    before = worker.overlapped
    results = await _launch_while_busy(worker, [(forward.launch, minilm, b) for b in batches])
    assert worker.overlapped == before  # the module's worker has the default depth, 1
    for got, batch in zip(results, batches):
        np.testing.assert_allclose(got, forward_each_alone(worker, minilm, batch), atol=1e-5)


# ---- the batcher: when a second batch may go out --------------------------------------------

class _Item:
    def __init__(self, cost: int):
        self.cost = cost


class _Device:
    """run_batch for the batcher: records each batch and holds it until the test releases it."""

    def __init__(self):
        self.batches: list[int] = []
        self.releases: list[asyncio.Event] = []

    async def __call__(self, prepared):
        self.batches.append(len(prepared))
        done = asyncio.Event()
        self.releases.append(done)
        await done.wait()
        return [np.full(2, p.cost, np.float32) for p in prepared]


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_second_batch_goes_out_only_once_it_matches_the_running_one():
    device = _Device()
    b = Batcher(device, max_batch_tokens=1000, max_batch_items=8, max_queue_items=100, max_in_flight=2)
    b.start()
    try:
        first = b.submit([_Item(10)] * 3)
        await _settle()
        assert device.batches == [3]
        b.submit([_Item(10)] * 2)
        await _settle()
        assert device.batches == [3]  # 2 waiting, 3 running: wait for more (or for the device)
        b.submit([_Item(10)])
        await _settle()
        assert device.batches == [3, 3]  # as large as the running one: out at once
        b.submit([_Item(10)] * 3)
        await _settle()
        assert device.batches == [3, 3]  # both slots taken
        device.releases[0].set()
        assert [float(v[0]) for v in await asyncio.gather(*first)] == [10.0] * 3
        await _settle()
        assert device.batches == [3, 3, 3]
    finally:
        for r in device.releases:
            r.set()
        await b.stop()


async def test_a_batch_full_by_the_limits_goes_out_alongside_a_larger_one():
    device = _Device()
    b = Batcher(device, max_batch_tokens=100, max_batch_items=8, max_queue_items=100, max_in_flight=2)
    b.start()
    try:
        b.submit([_Item(10)] * 4)
        await _settle()
        b.submit([_Item(60)] * 3)  # one per batch by the token budget: that batch is full
        await _settle()
        assert device.batches == [4, 1]
        device.releases[0].set()
        await _settle()
        assert device.batches == [4, 1, 1]
    finally:
        for r in device.releases:
            r.set()
        await b.stop()


async def test_one_in_flight_waits_for_the_device():
    device = _Device()
    b = Batcher(device, max_batch_tokens=1000, max_batch_items=8, max_queue_items=100)
    b.start()
    try:
        b.submit([_Item(10)] * 2)
        await _settle()
        b.submit([_Item(10)] * 5)
        await _settle()
        assert device.batches == [2]
        device.releases[0].set()
        await _settle()
        assert device.batches == [2, 5]
    finally:
        for r in device.releases:
            r.set()
        await b.stop()


async def test_stopping_fails_running_and_waiting_items():
    device = _Device()
    b = Batcher(device, max_batch_tokens=1000, max_batch_items=2, max_queue_items=100, max_in_flight=2)
    b.start()
    futures = b.submit([_Item(10)] * 5)
    await _settle()
    assert device.batches == [2, 2]
    await b.stop()
    for f in futures:
        with pytest.raises(RuntimeError, match="shutting down"):
            await f


# ---- the service with two batches in flight -------------------------------------------------

async def test_service_with_two_in_flight_gives_the_same_vectors():
    plain = EmbeddingService(make_settings(MINILM_SPEC, **{"engine.shape_buckets": "on"}))
    await plain.start()
    texts = [f"pipelined request {i} " + "word " * (i % 9) for i in range(48)]
    try:
        want = [r.vectors[0] for r in await asyncio.gather(*(plain.embed([EmbedItem(text=t)]) for t in texts))]
    finally:
        await plain.stop()
    deep = EmbeddingService(make_settings(MINILM_SPEC, **{"engine.shape_buckets": "on",
                                                          "engine.pipeline_depth": 2,
                                                          "engine.max_batch_items": 8}))
    await deep.start()
    try:
        info = deep.info()["worker"]
        assert info["pipeline_depth"] == 2 and deep.batcher.max_in_flight == 2
        got = []
        for wave in range(3):  # waves of 16 clients: batches of 8, the second out while the first runs
            got += [r.vectors[0] for r in await asyncio.gather(
                *(deep.embed([EmbedItem(text=t)]) for t in texts[16 * wave: 16 * wave + 16]))]
        assert deep.batcher.items_run >= 48
        for a, b in zip(got, want):
            assert cosine(a, b) >= 0.99999
    finally:
        await deep.stop()
