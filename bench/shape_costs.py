"""What a batch shape costs the first time the engine sees it, against the second time.

    python bench/shape_costs.py --model DIR --case image --image-side 448 --sizes 8 9 12 16 7 [--device gpu]
        [--fresh-inputs] [--busy-threads 2]

A server sees every batch size from 1 to engine.max_batch_items (and, for text, every padded
length); a raw benchmark repeats one shape. For each size this runs the embedder's forward (encode, then evaluate) twice in
a row on the MLX worker thread and reports, per run, wall time, the worker thread's CPU time, and
how much of the wall was spent building the lazy graph (encode) rather than evaluating it. Prints
one JSON object per run. --fresh-inputs gives every run new items (a server never sees the same
image twice); --busy-threads runs that many Python threads doing what the server's other threads
do (decode JSON, preprocess images) meanwhile, to show what sharing the GIL costs the worker.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--case", default="image", choices=["short", "long", "image", "fused"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 9, 12, 16, 7])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--image-side", type=int, default=448)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    ap.add_argument("--fresh-inputs", action="store_true")
    ap.add_argument("--busy-threads", type=int, default=0)
    args = ap.parse_args()

    import mlx.core as mx

    from tkr_embed.benchmark.raw import case_inputs, embed_items, load_on_worker

    worker, emb = load_on_worker(args.model, args.device)
    from mlx.utils import tree_flatten

    dtypes: dict[str, int] = {}
    for _, v in tree_flatten(emb.model.parameters()):
        dtypes[str(v.dtype)] = dtypes.get(str(v.dtype), 0) + v.size
    print(json.dumps({"parameters_by_dtype": dtypes}), flush=True)
    runs = args.repeats * len(args.sizes) if args.fresh_inputs else 1
    inputs = case_inputs(args.case, max(args.sizes) * runs, args.image_side)
    items = embed_items(inputs)
    prepared = [emb.prepare(it) for it in items]
    stop = threading.Event()

    def busy() -> None:  # the server's other Python work: JSON bodies and image preprocessing
        body = json.dumps({"input": [base64.b64encode(inputs[0][1] or b"x" * 300_000).decode()]})
        while not stop.is_set():
            json.loads(body)
            emb.prepare(items[0])

    for _ in range(args.busy_threads):
        threading.Thread(target=busy, daemon=True).start()

    def run(batch) -> dict:
        c0, t0 = time.thread_time(), time.perf_counter()
        lazy = emb.encode(batch)
        built = time.perf_counter()
        mx.eval(lazy)
        t1 = time.perf_counter()
        return {"graph_ms": round((built - t0) * 1000, 1), "eval_ms": round((t1 - built) * 1000, 1),
                "cpu_ms": round((time.thread_time() - c0) * 1000, 1)}

    offset = 0
    for size in args.sizes:
        for r in range(args.repeats):
            row = worker.call(run, prepared[offset:offset + size])
            if args.fresh_inputs:
                offset += size
            print(json.dumps({"case": args.case, "batch": size, "repeat": r, "fresh": args.fresh_inputs,
                              "busy_threads": args.busy_threads, **row}), flush=True)
    stop.set()
    # As tkr_embed/benchmark/raw.py: leave without tearing MLX down from the main thread (which
    # aborted with "terminate called without an active exception" and exit status 134).
    os._exit(0)


if __name__ == "__main__":
    main()
