"""Qwen2-VL's decoder with q, k and v projected by one matmul instead of three.

Why: on MLX's CUDA backend the host spends about as long launching each kernel as the device
spends running it, so a batch of short texts is bound by how many kernels it launches rather than
by its arithmetic (docs/benchmarks.md, "The host launches every kernel"). On an H100 this took a
Qwen2-VL-2B-sized engine from 2,041 to 2,159 short texts/s at batch 32 (1.09x) and 1.03x at batch
64, with long texts and images unchanged (docs/benchmarks.md, "q, k and v as one matmul"). Fusing
the MLP's gate and up projections the same way measured slower (0.97-0.98x) everywhere but short
batches of 32 (1.03x), so it is not done here (bench/fused_projections.py builds it to compare).

One matmul over the concatenated weights computes exactly the rows the three did (on that H100
the vectors were bit-identical in bfloat16). Quantised layers fuse the same way: MLX quantises
each output row on its own (its groups run along the input width), so concatenating the rows of
weights, scales and biases gives what quantising the fused weight would.

The embedder runs the decoder once over whole prompts, never with a KV cache; the module keeps
mlx-vlm's call signature for the layer that calls it, and refuses a cache.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_vlm.models.base import kv_sequence_length, scaled_dot_product_attention
from mlx_vlm.models.qwen2_vl.language import apply_multimodal_rotary_pos_emb

# What must agree for several layers' weights to become one layer's: the class and, if
# quantised, how.
_QUANT_FIELDS = ("group_size", "bits", "mode")
_ARRAYS = ("weight", "scales", "biases", "bias")


def fuse_linears(layers: Sequence[nn.Module]) -> nn.Module | None:
    """One layer computing `concatenate([layer(x) for layer in layers], axis=-1)`, or None when
    they cannot share one matmul (other classes, different quantisation, a bias on some only)."""
    first = layers[0]
    if type(first) not in (nn.Linear, nn.QuantizedLinear) or any(type(m) is not type(first) for m in layers):
        return None
    if any(getattr(m, f, None) != getattr(first, f, None) for m in layers for f in _QUANT_FIELDS):
        return None
    names = [k for k in _ARRAYS if k in first]
    if any([k for k in _ARRAYS if k in m] != names for m in layers):
        return None
    fused = copy.copy(first)  # same class and settings; its arrays are replaced below
    for name in names:
        fused[name] = mx.concatenate([m[name] for m in layers], axis=0)
    return fused


class FusedQKVAttention(nn.Module):
    """mlx-vlm's qwen2_vl Attention (mlx-vlm 0.7.10) with q_proj, k_proj and v_proj as one qkv_proj."""

    def __init__(self, attn: Any, qkv_proj: nn.Module):
        super().__init__()
        self.n_heads, self.n_kv_heads = attn.n_heads, attn.n_kv_heads
        self.head_dim, self.scale = attn.head_dim, attn.scale
        self.qkv_proj = qkv_proj
        self.o_proj = attn.o_proj
        self.rotary_emb = attn.rotary_emb

    def __call__(self, x, mask=None, cache=None, position_ids=None, position_embeddings=None):
        if cache is not None:
            raise ValueError("the embedder's decoder runs without a KV cache")
        B, L, _ = x.shape
        # Heads first, then the split: reshaping the fused output is free (it is contiguous), and
        # q, k and v become strided views of it along the head axis, as the transposed views of
        # three outputs were. Splitting the last axis first made MLX copy each part to reshape
        # it: that first version ran short batches at 0.93-0.95x of three matmuls on the H100.
        heads = self.qkv_proj(x).reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3)
        kv_start = self.n_heads + self.n_kv_heads
        queries, keys, values = heads[:, : self.n_heads], heads[:, self.n_heads : kv_start], heads[:, kv_start:]

        if position_ids is None:
            position_ids = mx.tile(mx.arange(L)[None], (3, 1, 1))
        if position_embeddings is None:
            queries, keys = self.rotary_emb.apply_rotary(queries, keys, position_ids, unsqueeze_dim=1)
        else:
            cos, sin = position_embeddings
            queries, keys = apply_multimodal_rotary_pos_emb(queries, keys, cos, sin, unqueeze_dim=1)

        if isinstance(mask, mx.array):
            mask = mask[..., : kv_sequence_length(keys)]
        output = scaled_dot_product_attention(queries, keys, values, None, scale=self.scale, mask=mask)
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(B, L, -1))


def fuse_qkv_projections(language_model: Any) -> int:
    """Give every decoder layer of mlx-vlm's qwen2_vl LanguageModel one q/k/v matmul, in place.
    Returns how many layers were fused; a layer whose weights cannot share a matmul stays as it
    was. Worker thread only: builds MLX arrays."""
    fused = 0
    for layer in language_model.model.layers:
        attn = layer.self_attn
        if isinstance(attn, FusedQKVAttention):
            continue
        qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        if qkv is not None:
            layer.self_attn = FusedQKVAttention(attn, qkv)
            fused += 1
    return fused


def separate_qkv_weights(model: Any, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """A Qwen2-VL `model`'s flat parameters (`weights`, as tree_flatten names them) in the
    checkpoint layout every Qwen2-VL loader reads: each fused qkv_proj split back into q_proj,
    k_proj and v_proj (`models convert` saves these). Layers left unfused pass through."""
    for i, layer in enumerate(model.language_model.model.layers):
        attn = layer.self_attn
        if not isinstance(attn, FusedQKVAttention):
            continue
        q_rows, kv_rows = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
        prefix = f"language_model.model.layers.{i}.self_attn."
        for name in _ARRAYS:
            fused = weights.pop(f"{prefix}qkv_proj.{name}", None)
            if fused is None:
                continue
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), mx.split(fused, [q_rows, q_rows + kv_rows], axis=0)):
                weights[f"{prefix}{proj}.{name}"] = part
    return weights
