"""Can two batches share the GPU? Raw forward throughput, one batch at a time against overlapped.

    python bench/stream_overlap.py --model DIR --case short --batch 32 64 --seconds 3 --device gpu --dtype bfloat16

At 64 closed-loop clients the server's batches settle at ~32 items (two cohorts: one runs while
the other travels; docs/benchmarks.md), so the server's ceiling is the engine's batch-32 rate,
0.76x of batch 64 on an H100. This measures whether the device has room for a second batch while
one runs. Modes, alternated in rounds on one loaded model (its decoder compiled, as the server's):
  serial    build, evaluate, copy out; then the next batch (what the engine does today)
  pipe1     one stream, up to two batches launched (mx.async_eval) before the oldest is copied out
  pipe2     the same on two GPU streams, alternating: kernels of both batches may run at once
With --processes P (P > 1) the serial mode instead runs in P processes at once, each with its own
copy of the model, started together for each round (a barrier), and the row reports their summed
items/s as `procsP`: what engine replicas sharing one GPU could do, where one process's MLX
thread is busy launching most of each batch (no MPS: the device time-slices between processes, so
this measures whether one process's host-side work hides behind another's kernels).
Reports items/s over each round (throughput, not a per-batch median: overlapped batches have no
batch time of their own), the median over rounds, and the share of each round the thread spent
launching (graph building and mx.async_eval). The MLX_* settings in the environment
(MLX_MAX_OPS_PER_BUFFER, MLX_CUDA_GRAPH_CACHE_SIZE, MLX_USE_CUDA_GRAPHS ...) are recorded with
each row. What the server made of it (nothing: the one MLX thread is busy launching for ~85% of
each batch, MLX's host cost per kernel): docs/benchmarks.md, "Two batches in flight, again" and
"The host launches every kernel".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("serial", "pipe1", "pipe2")


def main() -> None:
    from tkr_embed.benchmark.raw import add_forward_arguments

    ap = argparse.ArgumentParser()
    add_forward_arguments(ap)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--processes", type=int, default=1)
    args = ap.parse_args()
    if args.processes > 1:
        run_processes(args)
    else:
        measure(args)


def run_processes(args) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(args.processes), ctx.Queue()
    args.modes = ["serial"]
    procs = [ctx.Process(target=measure, args=(args, (barrier, results))) for _ in range(args.processes)]
    for p in procs:
        p.start()
    per_process = [results.get() for _ in procs]
    for p in procs:
        p.join()
    name = f"procs{args.processes}"
    for rows in zip(*per_process):
        row = {k: v for k, v in rows[0].items() if not k.startswith("serial")}
        rounds = [round(sum(r["serial_rounds"][i] for r in rows), 1) for i in range(args.rounds)]
        row[name] = round(statistics.median(rounds), 1)
        row[name + "_rounds"] = rounds
        row["per_process"] = [r["serial"] for r in rows]
        print(json.dumps(row), flush=True)


def measure(args, sync=None) -> None:
    """Rows for each case and batch size; with sync (a barrier and a queue: one of several
    processes) every round starts together and the rows go to the queue instead of stdout."""

    import mlx.core as mx
    import numpy as np

    from tkr_embed.benchmark.raw import prepared_inputs
    from tkr_embed.engine.worker import MLXWorker
    from tkr_embed.models.registry import load_embedder, resolve_model_dir

    worker = MLXWorker(args.device)
    worker.start()

    def setup():
        emb = load_embedder(resolve_model_dir(args.model), "none").embedder
        if args.dtype:
            emb.model.set_dtype(getattr(mx, args.dtype))
        if hasattr(emb, "use_compiled_graphs"):
            emb.use_compiled_graphs()
        return emb, [mx.default_stream(mx.default_device()), mx.new_stream(mx.default_device())]

    emb, streams = worker.call(setup)

    def prepared_for(case: str, b: int):
        return prepared_inputs(emb, case, b, args.image_side)

    def launch(prepared, stream):
        with mx.stream(stream):
            out = emb.encode(prepared)
        mx.async_eval(out)
        return out

    def run_round(mode: str, prepared, seconds: float) -> tuple[float, float]:
        """Items/s over `seconds` of back-to-back batches in this mode, and the share of that time
        the thread spent launching (building the graph and inside mx.async_eval): near 1 means
        the launch, not the device, sets the pace."""
        depth = 1 if mode == "serial" else 2
        use = streams[:2] if mode == "pipe2" else streams[:1]
        in_flight: list = []
        done = 0
        n = 0
        launching = 0.0
        t0 = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - t0
            if elapsed < seconds:
                s = time.perf_counter()
                in_flight.append(launch(prepared, use[n % len(use)]))
                launching += time.perf_counter() - s
                n += 1
            if not in_flight:
                break
            if len(in_flight) >= depth or elapsed >= seconds:
                np.array(in_flight.pop(0), copy=True)  # waits for that batch, as the engine does
                done += len(prepared)
        total = time.perf_counter() - t0
        return done / total, launching / total

    rows = []
    for case in args.case:
        for b in args.batch:
            prepared = prepared_for(case, b)
            ref = worker.call(lambda: np.array(launch(prepared, streams[0])))
            modes = args.modes
            for mode in modes:  # warm-up: compile and plan each stream's shapes once
                worker.call(run_round, mode, prepared, 0.5)
            # The second stream's vectors must equal the first's (same model, same inputs).
            other = worker.call(lambda: np.array(launch(prepared, streams[1])))
            samples = {m: [] for m in modes}
            shares = {m: [] for m in modes}
            for _ in range(args.rounds):
                for mode in modes:
                    if sync:
                        sync[0].wait()
                    rate, launch_share = worker.call(run_round, mode, prepared, args.seconds)
                    samples[mode].append(rate)
                    shares[mode].append(launch_share)
            row = {"case": case, "batch": b, "tokens_per_item": max(p.cost for p in prepared),
                   "max_abs_diff_stream2": float(np.abs(other - ref).max())}
            row["mlx_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MLX_")}
            for mode in modes:
                row[mode] = round(statistics.median(samples[mode]), 1)
                row[mode + "_rounds"] = [round(x, 1) for x in samples[mode]]
                row[mode + "_launch_share"] = round(statistics.median(shares[mode]), 3)
                if mode != "serial" and "serial" in row:
                    row[mode + "_vs_serial"] = round(row[mode] / row["serial"], 3)
            rows.append(row)
            if not sync:
                print(json.dumps(row), flush=True)
    if sync:
        sync[1].put(rows)
        sync[1].close()
        sync[1].join_thread()
    # As tkr_embed/benchmark/raw.py: leave without tearing MLX down from the main thread.
    os._exit(0)


if __name__ == "__main__":
    main()
