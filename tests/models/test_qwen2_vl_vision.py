"""The batched Qwen2-VL vision tower (models/qwen2_vl_vision.py) against mlx-vlm's own, on the
tiny model's real weights: same features for same-size images (one batched attention call),
mixed sizes (one call per frame) and multi-frame grids, and the same rotary position ids."""

from __future__ import annotations

import numpy as np
import pytest

from tkr_embed.engine.media import decode_image
from tkr_embed.models.qwen2_vl_checkpoint import load_qwen2_vl
from tkr_embed.models.qwen2_vl_vision import rotary_position_ids, use_batched_vision
from tkr_embed.models.registry import read_config

from tests.helpers import png_bytes


@pytest.fixture(scope="module")
def towers(worker, tiny_dir):
    """(mlx-vlm's model, the batched one): two loads of the same checkpoint."""
    config = read_config(tiny_dir)

    def load_both():
        stock, fast = load_qwen2_vl(tiny_dir, config), load_qwen2_vl(tiny_dir, config)
        use_batched_vision(fast)
        return stock, fast

    return worker.call(load_both)


def _features(worker, model, pixels, grid):
    import mlx.core as mx

    def run():
        out = model.vision_tower(mx.array(pixels), mx.array(grid))
        mx.eval(out)
        return np.array(out)

    return worker.call(run)


def _inputs(worker, tiny_dir, sizes):
    from tkr_embed.models.registry import load_embedder, resolve_model_dir

    emb = worker.call(load_embedder, resolve_model_dir(str(tiny_dir)), "none").embedder
    from tkr_embed.models.qwen2_vl_image import preprocess_image

    flats, grids = [], []
    for i, (w, h) in enumerate(sizes):
        flat, grid = preprocess_image(decode_image(png_bytes(w, h, i), 10**8, 10**9, ["PNG"]).image, emb.image_config)
        flats.append(flat)
        grids.append(grid)
    return np.concatenate(flats), np.stack(grids).reshape(-1, 3)


@pytest.mark.parametrize("sizes", [
    [(56, 56)],                          # one image
    [(56, 84)] * 3,                      # same size: one batched attention call
    [(56, 56), (112, 56), (28, 84)],     # mixed sizes: one call per image
])
def test_batched_tower_gives_mlx_vlm_features(worker, tiny_dir, towers, sizes):
    stock, fast = towers
    pixels, grid = _inputs(worker, tiny_dir, sizes)
    want = _features(worker, stock, pixels, grid)
    got = _features(worker, fast, pixels, grid)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_multi_frame_grids_attend_within_each_frame(worker, tiny_dir, towers):
    """A grid with t=2 (a two-frame clip) is two attention segments: both towers agree."""
    stock, fast = towers
    pixels, grid = _inputs(worker, tiny_dir, [(56, 56), (56, 56)])
    clip_grid = np.array([[2, *grid[0, 1:]]])  # the same patches, read as one 2-frame item
    want = _features(worker, stock, pixels, clip_grid)
    np.testing.assert_allclose(_features(worker, fast, pixels, clip_grid), want, atol=1e-5, rtol=1e-4)


def test_rotary_position_ids_follow_the_merge_windows():
    ids = rotary_position_ids(np.array([[1, 2, 4]]), merge=2)
    # 2x2 windows, left to right: (0,0) (0,1) (1,0) (1,1), then (0,2) (0,3) (1,2) (1,3)
    assert ids.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert rotary_position_ids(np.array([[3, 2, 2]]), 2).shape == (12, 2)  # frames repeat the grid


def test_same_size_images_take_one_attention_call_per_layer(worker, tiny_dir, towers, monkeypatch):
    import mlx.core as mx

    _, fast = towers
    calls = []
    real = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    depth = len(fast.vision_tower.blocks)
    _features(worker, fast, *_inputs(worker, tiny_dir, [(56, 84)] * 4))
    assert len(calls) == depth
    calls.clear()
    _features(worker, fast, *_inputs(worker, tiny_dir, [(56, 84), (56, 56)]))
    assert len(calls) == 2 * depth
