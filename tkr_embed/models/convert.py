"""`tkr-embed models convert SRC DST [--quantize q4|q8]`: write an MLX checkpoint.

The source (a Hugging Face directory or repo id) is loaded the way the server loads it, optionally
quantised, and saved in MLX's own layout: sanitised weight names, the vision tower's conv weight
already transposed, quantised tensors with their scales, and the quantisation recorded in
config.json. Loading it then skips renaming, transposing and quantising, and gives the same vectors.
Tokenizer, image-processor and sentence-transformers files are copied alongside.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm import tqdm

from .quantize import GROUP_SIZE
from .qwen2_vl_checkpoint import normalise_config
from .registry import detect_family, load_embedder, read_config, resolve_model_dir

# Files that describe weights (rewritten here), not copied from the source.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json")


def _is_weight_file(rel: Path) -> bool:
    # Only the top-level config.json describes the weights (1_Pooling/config.json is copied).
    return rel.as_posix() == "config.json" or rel.name.endswith(WEIGHT_SUFFIXES)


def convert(src: str, dst: str | Path, quantize: str | None = None, show_progress: bool = True) -> dict:
    from ..engine.worker import MLXWorker

    if quantize not in (None, "none", "q4", "q8"):
        raise ValueError(f"--quantize must be q4 or q8, got {quantize}")
    dst = Path(dst)
    resolved = resolve_model_dir(src)
    if dst.resolve() == resolved.path.resolve():
        raise ValueError("destination must differ from the source")
    config = read_config(resolved.path)
    family = detect_family(config)
    if "quantization" in config:
        raise ValueError(f"{src} is already quantised; convert from the full-precision checkpoint")
    others = [p for p in resolved.path.rglob("*") if p.is_file() and not _is_weight_file(p.relative_to(resolved.path))]

    bar = tqdm(total=3 + len(others), desc=f"converting {resolved.model_id}", unit="step", disable=not show_progress)
    worker = MLXWorker()
    worker.start()
    try:
        loaded = worker.call(load_embedder, resolved, quantize or "none")
        bar.update()
        bar.set_postfix_str("saving weights")
        dst.mkdir(parents=True, exist_ok=True)
        n_params = worker.call(_save_weights, loaded.embedder.model, dst / "model.safetensors", family)
        bar.update()
    finally:
        worker.stop()
    out_config = normalise_config(config) if family == "qwen2_vl" else dict(config)
    if quantize in ("q4", "q8"):
        out_config["quantization"] = {"group_size": GROUP_SIZE, "bits": 4 if quantize == "q4" else 8}
    out_config["tkr_embed_converted_from"] = resolved.model_id
    (dst / "config.json").write_text(json.dumps(out_config, indent=2))
    bar.update()
    for f in others:
        bar.set_postfix_str(f.name)
        target = dst / f.relative_to(resolved.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
        bar.update()
    bar.close()
    return {"family": family, "source": str(resolved.path), "destination": str(dst),
            "quantization": quantize or "none", "tensors": n_params,
            "bytes": (dst / "model.safetensors").stat().st_size}


def _save_weights(model, path: Path, family: str) -> int:
    """Worker thread only."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    if family == "qwen2_vl":  # on disk in the layout every loader reads, not the fused one the engine runs
        from .qwen2_vl_fused import separate_qkv_weights

        weights = separate_qkv_weights(model, weights)
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})
    return len(weights)
