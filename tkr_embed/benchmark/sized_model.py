"""A Qwen2-VL-2B-sized embedder with random weights, for GPU benchmarks where no hub is reachable.

    python -m tkr_embed.benchmark.sized_model DST --tokenizer-from TINY_DIR [--device cuda] [--dtype bfloat16]

transformers builds the model from Qwen2-VL-2B's shapes (1536-wide, 28 layers, 12 heads / 2 KV
heads, 8960 MLP; a 32-block, 1280-wide vision tower) with its own random initialisation and saves
it; the tokenizer and preprocessor files come from a `models make-tiny` directory (the real Qwen2
vocabulary). Speed is what it is for: the vectors mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..models.tiny import mrope_section, tiny_config, tiny_preprocessor_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def qwen2_vl_2b_config() -> dict:
    cfg = tiny_config(hidden=1536, layers=28, vision_depth=32)
    cfg.update(intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2, torch_dtype="bfloat16",
               rope_scaling={"type": "mrope", "mrope_section": mrope_section(128)})
    cfg["vision_config"].update(embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)
    return cfg


def make_sized(dst: str | Path, tokenizer_from: str | Path, device: str = "cuda", dtype: str = "bfloat16",
               max_pixels: int = 448 * 448) -> Path:
    import torch
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(qwen2_vl_2b_config(), indent=2))
    config = AutoConfig.from_pretrained(dst)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config).to(getattr(torch, dtype))
    model.save_pretrained(dst)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_from) / name, dst / name)
    (dst / "preprocessor_config.json").write_text(
        json.dumps(tiny_preprocessor_config(min_pixels=56 * 56, max_pixels=max_pixels), indent=2))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dst")
    ap.add_argument("--tokenizer-from", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    print(make_sized(args.dst, args.tokenizer_from, args.device, args.dtype))


if __name__ == "__main__":
    main()
