"""Shape buckets (engine/shapes.py): the bucket arithmetic, and real forward passes padded to a
bucketed shape (MiniLM; the tiny Qwen2-VL with images) that must give each real row's vector."""

from __future__ import annotations

import numpy as np

from tkr_embed.engine.shapes import (ShapeBuckets, ShapeTally, bucket, buckets_up_to, per_batch_ms, resolve_compile,
                                    resolve_shape_buckets)
from tkr_embed.engine.shards import ShardedForward
from tkr_embed.models.base import EmbedItem
from tkr_embed.models.registry import load_embedder, resolve_model_dir

from tests.helpers import decoded_png, forward_each_alone, mixed_multimodal_items


def test_buckets_are_every_small_size_then_four_per_octave():
    assert [bucket(n) for n in range(1, 9)] == list(range(1, 9))
    assert [bucket(n) for n in (9, 10, 11, 15, 16, 17, 33, 63, 64, 65, 300)] == [10, 10, 12, 16, 16, 20, 40, 64, 64, 80, 320]
    for n in range(1, 5000):  # never below n, never more than 25% above it
        assert n <= bucket(n) <= max(n, 1.25 * n) and bucket(bucket(n)) == bucket(n)
    assert buckets_up_to(64) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64]
    assert buckets_up_to(50) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 50]


def test_auto_buckets_only_on_cuda():
    assert resolve_shape_buckets("auto", on_cpu=False, cuda=True)
    assert not resolve_shape_buckets("auto", on_cpu=False, cuda=False)  # Metal
    assert not resolve_shape_buckets("auto", on_cpu=True, cuda=True)  # the CPU device of a CUDA build
    assert resolve_shape_buckets("on", on_cpu=True, cuda=False)
    assert not resolve_shape_buckets("off", on_cpu=False, cuda=True)
    # engine.compile follows the same rule: traced once per shape, so only where shapes are bucketed
    assert resolve_compile("auto", on_cpu=False, cuda=True)
    assert not resolve_compile("auto", on_cpu=False, cuda=False)
    assert not resolve_compile("auto", on_cpu=True, cuda=True)
    assert resolve_compile("on", on_cpu=True, cuda=False)


class _Item:
    def __init__(self, cost):
        self.cost = cost


def test_padding_repeats_the_last_item_and_stays_within_the_limits():
    b = ShapeBuckets(max_items=50)
    items = [_Item(c) for c in (3, 30, 9)]
    padded, length = b.pad(items, max_tokens=512)
    assert padded == items and length == 32  # 3 items is a bucket; 30 tokens pad to 32
    padded, length = b.pad([_Item(7)] * 9, max_tokens=512)
    assert len(padded) == 10 and padded[-1] is padded[-2] and length == 7
    assert len(b.pad([_Item(5)] * 49, 512)[0]) == 50  # the bucket (56) capped at max_batch_items
    assert b.pad([_Item(250)], max_tokens=256)[1] == 256  # never past the model's own limit (bucket: 256)
    assert b.pad([_Item(300)], max_tokens=256)[1] == 300  # an item already over it keeps its length
    # engine.length_buckets: a 448-pixel image's 278 tokens pad to 320 with 4 lengths per octave, 288 with 8
    assert b.pad([_Item(278)], max_tokens=32768)[1] == 320
    assert ShapeBuckets(max_items=50, length_steps=8).pad([_Item(278)], max_tokens=32768)[1] == 288


def test_bucketed_minilm_matches_each_itemforward_each_alone(worker, minilm):
    texts = [" ".join(["padding"] * n) + f" #{n}" for n in (1, 4, 9, 17, 33, 70, 5, 2, 11)]  # 9 items: pads to 10
    prepared = [minilm.prepare(EmbedItem(text=t)) for t in texts]
    forward = ShardedForward(1, ShapeBuckets(64))
    out = worker.call(forward, minilm, prepared)
    assert out.shape == (9, minilm.dimension)
    np.testing.assert_allclose(out, forward_each_alone(worker, minilm, prepared), atol=2e-5)


def test_bucketed_qwen2_vl_with_images_matches_each_itemforward_each_alone(worker, tiny):
    items = mixed_multimodal_items() + [
        EmbedItem(text="the last item, repeated as padding", images=(decoded_png(5),)),
        EmbedItem(text="one more so that nine pad to ten"),
        EmbedItem(text="eight"),
        EmbedItem(text="nine", images=(decoded_png(6, 28, 56),)),
    ]
    prepared = [tiny.prepare(i) for i in items]
    longest = max(p.cost for p in prepared)
    padded, length = ShapeBuckets(64).pad(prepared, tiny.max_tokens)
    assert len(padded) == 10 and length > longest  # both dimensions really padded
    out = worker.call(ShardedForward(1, ShapeBuckets(64)), tiny, prepared)
    np.testing.assert_allclose(out, forward_each_alone(worker, tiny, prepared), atol=1e-4)


def test_compiled_decoder_gives_the_eager_vectors_shape_after_shape(worker, tiny_dir):
    """engine.compile (CUDA's default) forced on the CPU: the tiny Qwen2-VL with its decoder traced
    by mx.compile gives the eager vectors, for bucketed batches with images, for a second shape,
    and for the first shape replayed with other items (pooled positions are inputs, not constants)."""
    eager = worker.call(load_embedder, resolve_model_dir(str(tiny_dir)), "none").embedder
    compiled = worker.call(load_embedder, resolve_model_dir(str(tiny_dir)), "none").embedder
    forward = ShardedForward(1, ShapeBuckets(64), compile=True)
    worker.call(forward.adopt, compiled)  # as the service does with each model it loads
    assert compiled.compiled and not eager.compiled
    prepared = [eager.prepare(i) for i in mixed_multimodal_items()]
    # Same-size images: the vision tower's blocks run compiled too, traced for the first batch
    # and replayed for the second (its pixels are inputs, not constants of the trace).
    same_size = [[eager.prepare(EmbedItem(text=f"picture {s}", images=(decoded_png(s),))) for s in seeds]
                 for seeds in ((11, 12, 13, 14), (15, 16, 17, 18))]
    for batch in (prepared, prepared[:3], prepared[::-1], *same_size):
        np.testing.assert_allclose(worker.call(forward, compiled, batch), worker.call(forward, eager, batch), atol=1e-5)
    assert list(compiled.model.vision_tower._compiled_runners) == [(4, 24)]  # 4 frames of 24 patches


async def test_batcher_budget_counts_bucketed_rows_on_real_forward_passes(worker, minilm):
    """The batcher fed by ShardedForward's own padded_tokens: with a budget of 9 padded rows a
    queue of 20 equal texts runs as 8 + 8 + 4 (9 would pad to 10 rows, over the budget), each row
    of every batch gets its own vector, and padded_tokens counts the rows the device ran."""
    import asyncio
    import functools

    from tkr_embed.engine.batcher import Batcher

    forward = ShardedForward(1, ShapeBuckets(64))
    prepared = [minilm.prepare(EmbedItem(text=f"same length text number {chr(97 + i)}")) for i in range(20)]
    cost = prepared[0].cost
    assert all(p.cost == cost for p in prepared)
    padded = forward.padded_tokens(minilm.max_tokens)
    length = padded(1, cost)
    assert padded(9, cost) == 10 * length  # 9 items pad to 10 rows

    batcher = Batcher(worker, functools.partial(forward, minilm), max_batch_tokens=9 * length,
                      max_batch_items=64, max_queue_items=100, padded_tokens=padded)
    batcher.start()
    try:
        vectors = await asyncio.gather(*batcher.submit(prepared))
    finally:
        await batcher.stop()
    assert list(batcher.recent_batch_sizes) == [8, 8, 4]
    assert batcher.padded_tokens == 20 * length and batcher.real_tokens == 20 * cost
    alone = forward_each_alone(worker, minilm, prepared)
    np.testing.assert_allclose(np.stack(vectors), alone, atol=2e-5)


def test_shape_tally_reports_what_the_batches_between_two_reports_cost():
    tally = ShapeTally()
    tally.add(32, 48, 0.016, 0.002, 0.014)
    before = tally.report()
    tally.add(32, 48, 0.020, 0.003, 0.018)
    tally.add(32, 48, 0.010, 0.001, 0.008)
    tally.add(40, 48, 0.030, 0.004, 0.020)
    assert tally.report()[0] == {"rows": 32, "length": 48, "batches": 3, "seconds": 0.046,
                                 "build_seconds": 0.006, "cpu_seconds": 0.04}
    # only the batches since `before`: two of (32, 48), one of (40, 48)
    assert per_batch_ms(tally.report(), before) == [
        {"rows": 32, "length": 48, "batches": 2, "ms": 15.0, "build_ms": 2.0, "cpu_ms": 13.0},
        {"rows": 40, "length": 48, "batches": 1, "ms": 30.0, "build_ms": 4.0, "cpu_ms": 20.0}]
    assert per_batch_ms(before, before) == []
