"""Batches split across MLX CPU streams: the split itself, and real forward passes (MiniLM, the
tiny Qwen2-VL with images) that must give the vectors one unsplit forward gives, row for row."""

from __future__ import annotations

import itertools
import os
import platform
import random

import numpy as np
import pytest

from tkr_embed.blas import set_blas_threads
from tkr_embed.engine.shards import (ShardedForward, resolve_shards, sequence_work, split_by_cost,
                                     split_by_work)
from tkr_embed.models.base import EmbedItem

from tests.helpers import forward_each_alone, mixed_multimodal_items


def _padded(costs, run):
    return len(run) * max(costs[i] for i in run)


def _best_split(costs, shards):
    """Brute force: the smallest achievable largest padded run over contiguous cuts of the sorted costs."""
    c = sorted(costs)
    best = len(c) * c[-1]
    for cuts in itertools.combinations(range(1, len(c)), min(shards, len(c)) - 1):
        bounds = (0, *cuts, len(c))
        best = min(best, max((e - s) * c[e - 1] for s, e in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("shards", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(6))
def test_split_covers_every_item_once_with_the_smallest_slowest_shard(shards, seed):
    rng = random.Random(seed)
    costs = [rng.choice([5, 22, 26, 60, 248, 252]) for _ in range(rng.randint(1, 11))]
    runs = split_by_cost(costs, shards)
    assert sorted(i for run in runs for i in run) == list(range(len(costs)))
    assert 1 <= len(runs) <= shards and all(runs)
    # Sorted by length: a run never holds an item longer than the next run's shortest.
    for a, b in zip(runs, runs[1:]):
        assert max(costs[i] for i in a) <= min(costs[i] for i in b)
    assert max(_padded(costs, r) for r in runs) == _best_split(costs, shards)


def test_equal_items_split_evenly_and_long_items_do_not_pad_short_ones():
    assert [len(r) for r in split_by_cost([22] * 33, 2)] == [17, 16]
    assert [len(r) for r in split_by_cost([22] * 64, 4)] == [16, 16, 16, 16]
    mixed = [252] * 8 + [26] * 20
    assert [sorted({mixed[i] for i in r}) for r in split_by_cost(mixed, 2)] == [[26], [252]]


@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_packed_split_covers_every_item_once_within_one_item_of_even(shards, seed):
    rng = random.Random(seed)
    work = [sequence_work(rng.choice([5, 22, 26, 60, 248, 252]), 384) for _ in range(rng.randint(1, 40))]
    groups = split_by_work(work, shards)
    assert sorted(i for g in groups for i in g) == list(range(len(work)))
    assert 1 <= len(groups) <= min(shards, len(work)) and all(groups)
    loads = [sum(work[i] for i in g) for g in groups]
    # Largest first to the least loaded: no group exceeds an even share by more than one item.
    assert max(loads) <= sum(work) / len(groups) + max(work)


def test_packed_split_mixes_lengths_to_balance_the_shards():
    # 20 queries and 8 passages: split by padded cost, one shard takes all the passages (5.5x the
    # other's work); packed, each shard gets half of each.
    work = [sequence_work(n, 384) for n in [252] * 8 + [26] * 20]
    loads = sorted(sum(work[i] for i in g) for g in split_by_work(work, 2))
    assert loads[1] / loads[0] < 1.02
    assert sequence_work(252, 384) / sequence_work(26, 384) > 252 / 26  # attention grows with length


def test_shards_resolve_per_backend():
    assert resolve_shards(0, on_cpu=False) == 1
    assert resolve_shards(3, on_cpu=False) == 1
    assert resolve_shards(3, on_cpu=True) == 3
    assert resolve_shards(0, on_cpu=True) == len(os.sched_getaffinity(0))


@pytest.mark.skipif("openblas" not in os.environ.get("LD_PRELOAD", ""), reason="needs OpenBLAS preloaded")
def test_blas_threads_are_settable_when_openblas_is_preloaded():
    assert set_blas_threads(1) == "openblas_set_num_threads"


@pytest.mark.skipif("openblas" not in os.environ.get("LD_PRELOAD", ""), reason="needs OpenBLAS preloaded")
def test_a_lone_item_runs_with_every_blas_thread_and_leaves_one_per_shard(worker, minilm):
    import ctypes

    get_threads = ctypes.CDLL(None).openblas_get_num_threads
    prepared = [minilm.prepare(EmbedItem(text="a lone request " * 40))]
    sharded = worker.call(ShardedForward, 2)
    seen = []
    forward = minilm.forward

    def watched(batch, *args):  # the real forward, noting the BLAS threads it ran with
        seen.append(get_threads())
        return forward(batch, *args)

    def run():
        minilm.forward = watched
        try:
            return sharded(minilm, prepared)
        finally:
            del minilm.forward

    out = worker.call(run)
    assert seen == [2]  # the matmuls of a lone item use both cores
    assert get_threads() == 1  # and the shards' single-threaded BLAS is back for the next batch
    np.testing.assert_allclose(out, forward_each_alone(worker, minilm, prepared), atol=2e-5)


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_minilm_matches_each_item_alone(worker, minilm, shards):
    rng = random.Random(shards)
    texts = [" ".join(["embedding"] * rng.choice([1, 6, 30, 200])) + f" #{i}" for i in range(21)]
    prepared = [minilm.prepare(EmbedItem(text=t)) for t in texts]
    sharded = worker.call(ShardedForward, shards)
    out = worker.call(sharded, minilm, prepared)
    np.testing.assert_allclose(out, forward_each_alone(worker, minilm, prepared), atol=2e-5)


@pytest.mark.skipif(platform.system() != "Linux", reason="the native kernels are built on Linux")
def test_packed_shards_keep_every_vector_in_its_row(worker, minilm):
    # Packed, the shards hold items in any order (largest first); the rows must come back in the
    # batch's order with the padded forward's vectors.
    rng = random.Random(7)
    texts = [" ".join(["passage"] * rng.choice([1, 4, 30, 120, 250])) + f" #{i}" for i in range(23)]
    prepared = [minilm.prepare(EmbedItem(text=t)) for t in texts]
    sharded = worker.call(ShardedForward, 2)
    padded = worker.call(sharded, minilm, prepared)
    worker.call(sharded.adopt, minilm)
    try:
        assert sharded.packs(minilm)
        packed = worker.call(sharded, minilm, prepared)
    finally:
        minilm.packed = False
    np.testing.assert_allclose(packed, padded, atol=1e-5)


@pytest.mark.skipif("openblas" not in os.environ.get("LD_PRELOAD", ""), reason="needs OpenBLAS preloaded")
@pytest.mark.skipif(platform.system() != "Linux", reason="the native kernels are built on Linux")
def test_a_packed_batch_dominated_by_one_text_runs_whole(worker, minilm):
    # One passage and one query: split, one stream would hold 92% of the work and the other idle.
    long, short = (minilm.prepare(EmbedItem(text=t)) for t in ("a long passage " * 80, "a query"))
    sharded = worker.call(ShardedForward, 2)
    worker.call(sharded.adopt, minilm)
    wholes = []
    whole = sharded._whole
    sharded._whole = lambda emb, batch: (wholes.append(len(batch)), whole(emb, batch))[1]
    try:
        out = worker.call(sharded, minilm, [long, short])
        worker.call(sharded, minilm, [long, long])  # two equal passages still split
    finally:
        minilm.packed = False
    assert wholes == [2]
    np.testing.assert_allclose(out, forward_each_alone(worker, minilm, [long, short]), atol=2e-5)


def test_packing_is_off_when_configured_off_or_with_shape_buckets(worker, minilm):
    from tkr_embed.engine.shapes import ShapeBuckets

    off = worker.call(lambda: ShardedForward(2, pack=False))
    worker.call(off.adopt, minilm)
    assert not off.packs(minilm)
    # Shape buckets exist to pad to a few shapes (CUDA): a packed batch has no shape to pad.
    assert worker.call(lambda: ShardedForward(1, ShapeBuckets(64), pack=True)).pack is False


def test_sharded_qwen2_vl_with_images_matches_each_item_alone(worker, tiny):
    items = mixed_multimodal_items()
    prepared = [tiny.prepare(i) for i in items]
    sharded = worker.call(ShardedForward, 2)
    out = worker.call(sharded, tiny, prepared)
    np.testing.assert_allclose(out, forward_each_alone(worker, tiny, prepared), atol=1e-4)
