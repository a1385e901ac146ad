"""Qwen2-VL's vision tower, restructured for batches of images: the same weights and the same
math as mlx-vlm's, with less graph to build and fewer, larger kernels.

mlx-vlm's tower, per forward: builds the rotary position ids with per-image MLX ops that read the
grid back from the device element by element; in each of its 32 layers recomputes the rotary
cos/sin twice (for q and for k); and runs attention as one call per image (split by cu_seqlens).
On an H100 with a Qwen2-VL-2B-sized model, building that graph took ~4.7 ms of Python per image
(holding the GIL, the GPU idle meanwhile) against ~8.7 ms of GPU time (bench/shape_costs.py).

Here: the position ids come from numpy (the grid sizes are host data); cos/sin are computed once
per forward and shared by every layer; and when every frame in the batch has the same number of
patches (a batch of same-size images: what a server sees most) attention is one batched call
over [frames, heads, patches, head_dim]. Mixed sizes keep one call per frame.

With `use_compiled_blocks` (engine.compile, on where batch shapes are bucketed) the blocks of
a batch of same-size frames run through mx.compile, traced once per (frames, patches per frame):
rotary, residual adds and the MLP's activation fuse into fewer kernels. On MLX's CUDA backend the
forward is bound by the host's cost per kernel launched (the worker thread was busy launching for
~85% of each batch), and on an H100 with a Qwen2-VL-2B-sized model the compiled blocks ran 32
images of 448 pixels at 166.6 items/s against 139.9 (docs/benchmarks.md).

Installed by switching the classes of the loaded modules (as models/fast_ops.py does), so the
checkpoint's weight names do not change.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import cache, partial
from typing import Optional

import numpy as np


def rotary_position_ids(grid: np.ndarray, merge: int) -> np.ndarray:
    """[patches, 2] (row, column) of every patch, in the order the patches are flattened: each
    merge x merge window's patches together, frames of an image repeating its grid."""
    out = []
    for t, h, w in grid:
        rows = np.repeat(np.arange(h)[:, None], w, axis=1)
        cols = np.repeat(np.arange(w)[None, :], h, axis=0)
        pair = [a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1) for a in (rows, cols)]
        out.append(np.tile(np.stack(pair, axis=-1), (t, 1)))
    return np.concatenate(out).astype(np.int32)


def _rope(x, cos, sin):
    """mlx-vlm's apply_rotary_pos_emb_vision with cos/sin given: computed in float32, cast back."""
    from mlx_vlm.models.rope_utils import rotate_half

    return ((x * cos) + (rotate_half(x) * sin)).astype(x.dtype)


@cache
def _attention_class():
    from mlx_vlm.models.qwen2_vl.vision import Attention

    class BatchedVisionAttention(Attention):
        def __call__(self, x, segments: tuple[int, ...], cos=None, sin=None):
            import mlx.core as mx

            n = x.shape[0]
            qkv = self.qkv(x).reshape(n, 3, self.num_heads, -1)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [patches, heads, head_dim]
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            if len(set(segments)) == 1:  # frames of one size: one attention call for all of them
                frames, size = len(segments), segments[0]
                q, k, v = (t.reshape(frames, size, self.num_heads, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
                out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
                out = out.transpose(0, 2, 1, 3).reshape(n, -1)
            else:
                q, k, v = (t.transpose(1, 0, 2)[None] for t in (q, k, v))  # [1, heads, patches, head_dim]
                bounds = np.cumsum(segments)[:-1].tolist()
                parts = [mx.fast.scaled_dot_product_attention(a, b, c, scale=self.scale)
                         for a, b, c in zip(*(mx.split(t, bounds, axis=2) for t in (q, k, v)))]
                out = mx.concatenate(parts, axis=2)[0].transpose(1, 0, 2).reshape(n, -1)
            return self.proj(out)

    return BatchedVisionAttention


# Compiled block runners kept per tower (least recently used dropped first): shapes are
# (frames, patches per frame), and bucketed batches of one image size need a handful.
MAX_COMPILED_SHAPES = 32


@cache
def _tower_class():
    from mlx_vlm.models.qwen2_vl.vision import VisionModel

    class BatchedVisionModel(VisionModel):
        def __call__(self, hidden_states, grid_thw, output_hidden_states: Optional[bool] = None):
            import mlx.core as mx

            grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
            hidden = self.patch_embed(hidden_states)
            # Rotary angles, once: [patches, 1, head_dim] (the table as mlx-vlm computes it).
            pos = rotary_position_ids(grid, self.spatial_merge_size)
            table = self.rotary_pos_emb(mx.array(int(grid[:, 1:].max())))
            freqs = table[mx.array(pos)].reshape(pos.shape[0], 1, -1)
            freqs = mx.concatenate([freqs, freqs], axis=-1)
            cos, sin = mx.cos(freqs), mx.sin(freqs)
            # Attention runs within each frame of each image.
            segments = tuple(int(h * w) for t, h, w in grid for _ in range(int(t)))
            return self.merger(self._blocks_for(segments)(hidden, cos, sin))

        def _blocks_for(self, segments: tuple[int, ...]):
            """The blocks as one function of (hidden, cos, sin): compiled for this shape where
            use_compiled_blocks is on and the frames are of one size (what bucketed batches of
            same-size images give: few shapes), eager otherwise."""
            runners = getattr(self, "_compiled_runners", None)
            if runners is None or len(set(segments)) != 1:
                return partial(self._run_blocks, segments)
            key = (len(segments), segments[0])
            if key in runners:
                runners.move_to_end(key)
            else:
                import mlx.core as mx

                runners[key] = mx.compile(partial(self._run_blocks, segments))
                if len(runners) > MAX_COMPILED_SHAPES:  # each holds its traced graph
                    runners.popitem(last=False)
            return runners[key]

        def _run_blocks(self, segments, hidden, cos, sin):
            for blk in self.blocks:
                hidden = hidden + blk.attn(blk.norm1(hidden), segments, cos, sin)
                hidden = hidden + blk.mlp(blk.norm2(hidden))
            return hidden

    return BatchedVisionModel


def use_compiled_blocks(model) -> None:
    """Run the (batched) vision tower's blocks through mx.compile for same-size frames. Worker
    thread only: the first batch of each shape traces."""
    # A plain attribute: an MLX Module keeps dicts assigned to it as children (its parameter tree).
    vars(model.vision_tower)["_compiled_runners"] = OrderedDict()


def use_batched_vision(model) -> None:
    """Switch a loaded mlx-vlm Qwen2-VL model's vision tower to the batched forward, in place."""
    tower = model.vision_tower
    tower.__class__ = _tower_class()
    attention = _attention_class()
    for blk in tower.blocks:
        blk.attn.__class__ = attention
