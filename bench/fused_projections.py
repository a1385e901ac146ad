"""Qwen2-VL's decoder with q, k and v fused into one matmul against three: raw forward throughput.

    python bench/fused_projections.py --model DIR --case short long image --batch 8 32 64 \
        --seconds 2 --rounds 3 --device gpu --dtype bfloat16

Loads the model once per variant on one MLX worker:
  separate  q, k and v as three matmuls, as the checkpoint has them
  qkv       one q/k/v matmul, as the server runs it (models/qwen2_vl_fused.py)
  mlp       the MLP's gate and up projections as one matmul instead (measured slower on an H100,
            0.97-0.98x, so only this script builds it)
  both      qkv and mlp
Each runs the engine's own forward (the raw ceiling's path: tkr_embed/benchmark/raw.py, decoder
and vision blocks compiled where engine.compile: auto would), alternating in rounds with the
order flipped each round, on the same prepared batch. Prints one JSON row per case and batch
size: items/s per round (median batch time) for each variant, the median of its per-round ratios
to the first variant, and how far its vectors are from the first's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("separate", "qkv", "mlp", "both")


def fuse_gate_up(language_model) -> None:
    """Every decoder layer's SwiGLU MLP with gate_proj and up_proj as one matmul (the `mlp` variant)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_vlm.models.activations import swiglu

    from tkr_embed.models.qwen2_vl_fused import fuse_linears

    class FusedSwiGLUMLP(nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.gate_up_proj = fuse_linears([mlp.gate_proj, mlp.up_proj])
            self.down_proj = mlp.down_proj

        def __call__(self, x):
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
            return self.down_proj(swiglu(gate, up))

    for layer in language_model.model.layers:
        layer.mlp = FusedSwiGLUMLP(layer.mlp)


def main() -> None:
    from tkr_embed.benchmark.raw import add_forward_arguments

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_forward_arguments(ap)  # --model: a Qwen2-VL embedder's directory
    ap.add_argument("--variants", nargs="+", default=["separate", "qkv"], choices=VARIANTS,
                    help="the first is the one the others are compared with")
    args = ap.parse_args()

    import numpy as np

    from tkr_embed.benchmark.raw import case_inputs, embed_items, time_batches
    from tkr_embed.engine.shards import make_sharded_forward
    from tkr_embed.engine.worker import MLXWorker
    from tkr_embed.models.qwen2_vl import Qwen2VLEmbedder
    from tkr_embed.models.registry import read_config, resolve_model_dir

    worker = MLXWorker(args.device)
    worker.start()
    resolved = resolve_model_dir(args.model)
    config = read_config(resolved.path)

    def load(variant: str):
        import mlx.core as mx

        emb = Qwen2VLEmbedder.load(resolved.path, resolved.model_id, config, "none",
                                   fuse_qkv=variant in ("qkv", "both"))
        if variant in ("mlp", "both"):
            fuse_gate_up(emb.model.language_model)
        if args.dtype:
            emb.model.set_dtype(getattr(mx, args.dtype))
        forward = make_sharded_forward(0, "off", 64, "auto")
        forward.adopt(emb)
        return emb, forward

    variants = {name: worker.call(load, name) for name in args.variants}

    for case in args.case:
        for b in args.batch:
            base = args.variants[0]
            items = embed_items(case_inputs(case, b, args.image_side))
            prepared = [variants[base][0].prepare(it) for it in items]  # the same tokens for all
            vectors = {name: worker.call(fwd, emb, prepared) for name, (emb, fwd) in variants.items()}
            rates: dict[str, list[float]] = {name: [] for name in variants}
            for r in range(args.rounds):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for name in order:
                    emb, fwd = variants[name]
                    row = worker.call(time_batches, lambda: fwd(emb, prepared), b, args.seconds)
                    rates[name].append(row["items_per_s"])
            row = {"case": case, "batch": b, "tokens_per_item": max(p.cost for p in prepared),
                   "device": args.device, "dtype": args.dtype}
            a = vectors[base]
            for name in variants:
                row[name + "_items_per_s"] = rates[name]
                if name == base:
                    continue
                f = vectors[name]
                ratios = [x / y for x, y in zip(rates[name], rates[base])]
                cos = (a * f).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(f, axis=1))
                row[f"{name}_vs_{base}"] = round(statistics.median(ratios), 3)
                row[f"{name}_vs_{base}_rounds"] = [round(x, 3) for x in ratios]
                row[f"{name}_min_cosine"] = float(cos.min())
                row[f"{name}_max_abs_diff"] = float(np.abs(a - f).max())
            print(json.dumps(row), flush=True)
    # As tkr_embed/benchmark/raw.py: leave without tearing MLX down from the main thread.
    os._exit(0)


if __name__ == "__main__":
    main()
