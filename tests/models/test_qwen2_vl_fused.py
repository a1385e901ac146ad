"""Qwen2-VL's q/k/v projections fused into one matmul (models/qwen2_vl_fused.py), real MLX on the
tiny model: the same vectors as three matmuls, quantised or not, and only where the weights can
share a matmul."""

from __future__ import annotations

import numpy as np
import pytest

from tkr_embed.models.base import EmbedItem
from tkr_embed.models.qwen2_vl import Qwen2VLEmbedder
from tkr_embed.models.registry import read_config

from tests.helpers import mixed_multimodal_items


def _load(tiny_dir, quantization: str, fuse_qkv: bool):
    return Qwen2VLEmbedder.load(tiny_dir, "tiny", read_config(tiny_dir), quantization, fuse_qkv=fuse_qkv)


@pytest.mark.parametrize("quantization", ["none", "q8", "q4"])
def test_fused_qkv_gives_the_vectors_of_three_matmuls(worker, tiny_dir, quantization):
    from tkr_embed.models.qwen2_vl_fused import FusedQKVAttention

    items = mixed_multimodal_items() + [EmbedItem(text="query", instruction="Find the matching image.")]

    def vectors(fuse_qkv: bool):
        emb = _load(tiny_dir, quantization, fuse_qkv)
        attention = [type(layer.self_attn) for layer in emb.model.language_model.model.layers]
        return emb.forward([emb.prepare(i) for i in items]), attention

    separate, kinds = worker.call(vectors, False)
    fused, fused_kinds = worker.call(vectors, True)
    assert FusedQKVAttention not in kinds
    assert fused_kinds == [FusedQKVAttention] * len(kinds)
    # Quantised, the fused rows are the separate rows' own quantisation: the same numbers.
    np.testing.assert_allclose(fused, separate, rtol=0, atol=1e-5)


def test_fused_layer_is_the_three_layers_side_by_side(worker):
    """fuse_linears on full-precision and quantised layers: one matmul, the three outputs in
    order; and no fusion where the layers differ in bias, class or quantisation."""

    def check():
        import mlx.core as mx
        import mlx.nn as nn

        from tkr_embed.models.qwen2_vl_fused import fuse_linears

        mx.random.seed(3)
        x = mx.random.normal((2, 5, 128))
        q, k, v = nn.Linear(128, 64), nn.Linear(128, 32), nn.Linear(128, 32)
        q_weight = np.array(q.weight)
        out = {}
        for name, layers in {"float": [q, k, v],
                             "q4": [nn.QuantizedLinear.from_linear(m, 64, 4) for m in (q, k, v)]}.items():
            fused = fuse_linears(layers)
            assert type(fused) is type(layers[0])
            out[name] = np.abs(np.array(fused(x)) - np.array(mx.concatenate([m(x) for m in layers], -1))).max()
        # The originals are untouched (the fused layer is a copy with its own arrays).
        assert q.weight.shape == (64, 128)
        np.testing.assert_array_equal(np.array(q.weight), q_weight)
        refused = [
            fuse_linears([q, nn.Linear(128, 32, bias=False), v]),  # a bias on some only
            fuse_linears([q, nn.QuantizedLinear.from_linear(k, 64, 4), v]),  # float beside quantised
            fuse_linears([nn.QuantizedLinear.from_linear(m, 64, b) for m, b in ((q, 4), (k, 8), (v, 4))]),
            fuse_linears([nn.Embedding(10, 128), nn.Embedding(10, 128)]),  # not a linear layer
        ]
        return out, refused

    out, refused = worker.call(check)
    assert out["float"] < 1e-5 and out["q4"] < 1e-5
    assert refused == [None] * 4


def test_fused_attention_refuses_a_kv_cache(worker, tiny_dir):
    def call_with_cache():
        import mlx.core as mx

        layer = _load(tiny_dir, "none", True).model.language_model.model.layers[0]
        x = mx.zeros((1, 4, layer.hidden_size))
        with pytest.raises(ValueError, match="without a KV cache"):
            layer.self_attn(x, cache=object())
        return layer.self_attn(x).shape  # and works without one

    assert tuple(worker.call(call_with_cache)) == (1, 4, 64)


def test_fused_model_saves_the_separate_layout(worker, tiny_dir):
    """What `models convert` writes: q_proj, k_proj and v_proj as the checkpoint had them."""

    def weights():
        from mlx.utils import tree_flatten

        from tkr_embed.models.qwen2_vl_fused import separate_qkv_weights

        fused, separate = _load(tiny_dir, "q8", True).model, _load(tiny_dir, "q8", False).model
        saved = separate_qkv_weights(fused, dict(tree_flatten(fused.parameters())))
        return ({k: np.array(v) for k, v in saved.items()},
                {k: np.array(v) for k, v in tree_flatten(separate.parameters())})

    saved, expected = worker.call(weights)
    assert not [k for k in saved if "qkv_proj" in k]
    assert sorted(saved) == sorted(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(saved[k], v, err_msg=k)
