"""The native fused BERT attention against the MLX-ops attention it replaces, one core, alternating.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
      .venv/bin/python bench/fused_attention.py --rounds 5

One BERT layer's attention on MiniLM's shapes (12 heads of 32), from the q/k/v projections to the
merged-heads output: tkr_embed/native's bert_attention against tkr_embed/models/fast_ops'
poly_attention (the polynomial softmax, row sums from the value product). Single
-threaded BLAS, as each of the engine's CPU streams runs it. One JSON row per shape: median ms per
call over rounds, their ratio, and the largest difference from MLX's own attention
(mx.fast.scaled_dot_product_attention, what stock BERT runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADS, HEAD_DIM = 12, 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["4x252", "8x128", "16x40", "32x26"],
                    help="batch x tokens (one shard's share of a batch)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=11)
    args = ap.parse_args()

    import mlx.core as mx
    import numpy as np

    from tkr_embed.blas import set_blas_threads
    from tkr_embed.models.fast_ops import poly_attention
    from tkr_embed.native import bert_attention

    fused = bert_attention()
    if fused is None:
        raise SystemExit("the native kernels are not built: python -m tkr_embed.native.build")
    set_blas_threads(1)

    def stock(q, k, v, mask, B, L, scale):  # MLX's own attention, as stock BERT runs it
        split = lambda x: x.reshape(B, L, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)  # noqa: E731
        out = mx.fast.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(B, L, HEADS * HEAD_DIM)

    rng = np.random.default_rng(0)
    scale = HEAD_DIM ** -0.5
    for shape in args.shapes:
        B, L = map(int, shape.split("x"))
        q, k, v = (mx.array(rng.standard_normal((B, L, HEADS * HEAD_DIM)).astype(np.float32)) for _ in range(3))
        mask = mx.zeros((B, L))  # no padding: both do the full work
        versions = {"fused": lambda: fused(q, k, v, mask, heads=HEADS, scale=scale),
                    "mlx_ops": lambda: poly_attention(q, k, v, mask.reshape(B, 1, 1, L), HEADS, scale)}
        reference = stock(q, k, v, mask.reshape(B, 1, 1, L), B, L, scale)
        max_diff = {name: float(mx.max(mx.abs(f() - reference))) for name, f in versions.items()}
        ms: dict[str, list[float]] = {name: [] for name in versions}
        for r in range(args.rounds):
            for name in (list(versions) if r % 2 == 0 else list(versions)[::-1]):
                times = []
                for _ in range(args.runs):
                    t = time.perf_counter()
                    mx.eval(versions[name]())
                    times.append(time.perf_counter() - t)
                ms[name].append(round(1000 * statistics.median(times), 3))
        medians = {name: statistics.median(v) for name, v in ms.items()}
        print(json.dumps({"shape": shape, "ms_per_round": ms, "median_ms": medians,
                          "speedup": round(medians["mlx_ops"] / medians["fused"], 2),
                          "max_abs_diff_to_stock": max_diff}), flush=True)


if __name__ == "__main__":
    main()
