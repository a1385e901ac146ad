"""Does mx.compile of the Qwen2-VL language model speed up the engine's forward? (engine.compile)

    python bench/compile_check.py --model DIR --case short --batch 64 --seconds 3 [--device gpu]

Times the embedder's forward (graph building + evaluation) at one batch size, eager and with the
language model's decoder compiled (Qwen2VLEmbedder.use_compiled_graphs, engine.compile), alternating, and reports the medians, the time
spent building the graph, the first compiled call and the largest difference in the vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--case", default="short", choices=["short", "long"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()

    import mlx.core as mx
    import numpy as np

    from tkr_embed.benchmark.raw import case_inputs
    from tkr_embed.engine.worker import MLXWorker
    from tkr_embed.models.base import EmbedItem
    from tkr_embed.models.registry import load_embedder, resolve_model_dir

    worker = MLXWorker(args.device)
    worker.start()

    def setup():
        emb = load_embedder(resolve_model_dir(args.model), "none").embedder
        if args.dtype:  # as the raw benchmark casts it (tkr_embed/benchmark/raw.py)
            emb.model.set_dtype(getattr(mx, args.dtype))
        return emb

    emb = worker.call(setup)
    prepared = [emb.prepare(EmbedItem(text=t)) for t, _ in case_inputs(args.case, args.batch)]
    worker.call(emb.use_compiled_graphs)  # the embedder's own switch (engine.compile)
    decoders = {"eager": emb._decoder, "compiled": emb._decode}

    def run(mode: str):
        emb._decode = decoders[mode]
        s = time.perf_counter()
        out = emb.encode(prepared)
        g = time.perf_counter()
        mx.eval(out)
        e = time.perf_counter()
        return np.array(out), g - s, e - s

    results = {}
    first = worker.call(lambda: run("compiled")[2])
    ref = worker.call(lambda: run("eager")[0])
    samples = {"eager": [], "compiled": []}
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 2 * args.seconds:
        for mode in ("eager", "compiled"):
            out, graph, total = worker.call(lambda: run(mode))
            samples[mode].append((total, graph))
            if mode == "compiled":
                cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
                results["max_abs_diff"] = float(np.abs(out - ref).max())
                results["min_cosine_to_eager"] = float(cos.min())
    for mode, rows in samples.items():
        rows.sort()
        total, graph = rows[len(rows) // 2]
        results[mode] = {"items_per_s": round(args.batch / total, 1), "batch_ms": round(total * 1e3, 2),
                         "graph_ms": round(graph * 1e3, 2), "runs": len(rows)}
    results["first_compiled_ms"] = round(first * 1e3, 1)
    results["speedup"] = round(results["eager"]["batch_ms"] / results["compiled"]["batch_ms"], 3)
    print(json.dumps({"case": args.case, "batch": args.batch, **results}), flush=True)
    # Leave without tearing MLX down: the interpreter's exit after MLX ran on the worker thread
    # aborts ("terminate called without an active exception"), as in tkr_embed/benchmark/raw.py.
    os._exit(0)


if __name__ == "__main__":
    main()
