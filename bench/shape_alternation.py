"""Does a batch cost more when the batch before it had another shape? Raw forward passes on MLX's CUDA backend.

    python bench/shape_alternation.py --model DIR --device gpu --dtype bfloat16 --batch 20 24 28 32 40 48

A server's batches change shape from one to the next (64 clients on an H100 ran 20-48 rows of
short texts, docs/benchmarks.md), while the raw loop repeats one. MLX's CUDA backend records each
command buffer as a CUDA graph and keys its cache of instantiated graphs by topology only, not by
shape: the next batch of another shape finds the last one's graph and tries to update it in place
(cudaGraphExecUpdate), and where the kernels differ that fails and the graph is instantiated anew.
Each command buffer has its own encoder per stream, so giving each shape a stream of its own keeps
every shape's graphs apart. Modes, alternated in rounds on one loaded model (decoder compiled,
batches padded to the server's shape buckets, as the server runs them):

  repeat    each shape over and over (the raw ceiling's way)
  turns     the shapes in turn on the default stream (the server's way)
  streams   the shapes in turn, each shape on a GPU stream of its own

Prints one JSON line: the mean ms per batch of each shape in each mode, per round and the median.
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

MODES = ("repeat", "turns", "streams")


def main() -> None:
    from tkr_embed.benchmark.raw import prepared_inputs, sharded_engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="gpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--case", default="short")
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 40])
    ap.add_argument("--seconds", type=float, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = ap.parse_args()

    import mlx.core as mx

    worker, emb, forward = sharded_engine(args.model, args.device, 0, args.dtype, shape_buckets="on")
    batches = {b: prepared_inputs(emb, args.case, b, offset=1000 * b)
               for b in args.batch}
    shapes = {b: forward.buckets.shape(b, max(p.cost for p in bt), emb.max_tokens) for b, bt in batches.items()}
    streams = worker.call(lambda: {b: mx.new_stream(mx.gpu if args.device == "gpu" else mx.cpu) for b in batches})

    def run(mode: str, seconds: float) -> dict[int, float]:
        """Mean ms per batch of each shape over `seconds` (repeat: seconds per shape)."""
        spent = {b: [0.0, 0] for b in batches}

        def one(b: int) -> None:
            s = time.perf_counter()
            if mode == "streams":
                with mx.stream(streams[b]):
                    forward(emb, batches[b])
            else:
                forward(emb, batches[b])
            spent[b][0] += time.perf_counter() - s
            spent[b][1] += 1

        if mode == "repeat":
            for b in batches:
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < seconds / len(batches):
                    one(b)
        else:
            t0, k = time.perf_counter(), 0
            order = list(batches)
            while time.perf_counter() - t0 < seconds:
                one(order[k % len(order)])
                k += 1
        return {b: round(1000 * t / max(n, 1), 2) for b, (t, n) in spent.items()}

    for mode in args.modes:  # every shape traced and compiled, on every stream it will use
        worker.call(run, mode, 2.0)
    rounds: dict[str, list[dict[int, float]]] = {m: [] for m in args.modes}
    for r in range(args.rounds):
        for mode in (args.modes if r % 2 == 0 else args.modes[::-1]):
            rounds[mode].append(worker.call(run, mode, args.seconds))
            print(f"round {r + 1} {mode}: {rounds[mode][-1]}", file=sys.stderr, flush=True)
    medians = {m: {b: statistics.median(x[b] for x in rs) for b in batches} for m, rs in rounds.items()}
    # the mean batch time over the shapes in turn, as a server running them in equal numbers sees it
    overall = {m: round(statistics.mean(v.values()), 2) for m, v in medians.items()}
    print(json.dumps({"device": args.device, "dtype": args.dtype, "case": args.case,
                      "shapes (rows, length)": shapes, "mean_ms_per_batch": medians, "mean_over_shapes": overall,
                      "rounds": rounds}), flush=True)
    os._exit(0)  # MLX-CUDA 0.32.4 aborts at interpreter exit with the worker's stream alive (raw.py)


if __name__ == "__main__":
    main()
