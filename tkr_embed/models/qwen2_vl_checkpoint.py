"""Load Qwen2-VL checkpoints of either Hugging Face layout into mlx-vlm's modules.

transformers < 4.52 saved `model.layers.*` / `visual.*` / `lm_head.*` with a flat config (the
layout of gme-Qwen2-VL and Ops-MM-embedding-v1 on the Hub); later versions save
`model.language_model.*` / `model.visual.*` and nest the text settings under `text_config`.
mlx-vlm's qwen2_vl sanitizer only understands the first, so both are normalised to it here, then
mlx-vlm's own sanitizers and weight loader (quantised checkpoints included) take over.
"""

from __future__ import annotations

from pathlib import Path


def normalise_config(config: dict) -> dict:
    """Flat text settings at the top level, as mlx-vlm's ModelConfig.from_dict expects."""
    cfg = dict(config)
    text = cfg.get("text_config")
    if isinstance(text, dict):
        for k, v in text.items():
            if k not in cfg or k == "model_type" and cfg.get("model_type") is None:
                cfg[k] = v
        cfg.pop("text_config")
    cfg["model_type"] = "qwen2_vl"
    # transformers >= 5 writes RoPE settings as rope_parameters (no rope_scaling / rope_theta).
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_scaling" not in cfg and "mrope_section" in rope:
            cfg["rope_scaling"] = {"type": "mrope", "mrope_section": list(rope["mrope_section"])}
        if "rope_theta" not in cfg and "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
    # ... and names the vision tower's type qwen2_vl_vision, which mlx-vlm knows as qwen2_vl.
    vision = cfg.get("vision_config")
    if isinstance(vision, dict) and vision.get("model_type") == "qwen2_vl_vision":
        cfg["vision_config"] = {**vision, "model_type": "qwen2_vl"}
    return cfg


def normalise_keys(weights: dict) -> dict:
    out = {}
    for k, v in weights.items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            k = k[len("model."):]
        elif k.startswith("language_model.") and not k.startswith(("language_model.model.", "language_model.lm_head")):
            # saved from the bare Qwen2VLModel: language_model.layers.* (mlx-vlm's own checkpoints
            # have language_model.model.layers.* and are left alone)
            k = "model." + k[len("language_model."):]
        out[k] = v
    return out


def load_qwen2_vl(model_dir: Path, config: dict):
    """Worker thread only: returns mlx-vlm's qwen2_vl Model with the checkpoint's weights."""
    import mlx.core as mx
    from mlx_vlm.utils import get_model_and_args, load_model_weights, sanitize_weights, update_module_configs

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    weights: dict = {}
    for f in files:
        weights.update(mx.load(str(f)))
    weights = normalise_keys(weights)

    cfg = normalise_config(config)
    model_class, _ = get_model_and_args(config=cfg, model_path=model_dir)
    cfg.setdefault("vision_config", {})
    # from_dict copies the flat text settings into cfg["text_config"] (in place, as in mlx-vlm's
    # own load_model); update_module_configs then turns the sub-dicts into their config classes.
    model_config = model_class.ModelConfig.from_dict(cfg)
    model_config = update_module_configs(model_config, model_class, cfg, ["text", "vision"])
    model = model_class.Model(model_config)
    weights = sanitize_weights(model, weights)
    weights = sanitize_weights(model_class.VisionModel, weights, model_config.vision_config)
    weights = sanitize_weights(model_class.LanguageModel, weights, model_config.text_config)
    # Embedders never use the LM head; drop it rather than require it (tied or not).
    weights = {k: v for k, v in weights.items() if not k.startswith("language_model.lm_head")}
    if not getattr(model_config.text_config, "tie_word_embeddings", False) and hasattr(model.language_model, "lm_head"):
        del model.language_model.lm_head
    return load_model_weights(model, cfg, weights, model_dir)
