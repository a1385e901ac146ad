"""A randomly initialised Qwen2-VL embedder (real tokenizer, real image-processor config) in
tkr-embed (MLX) against transformers' Qwen2VLModel on torch, same weights; preprocessing parity;
quantisation error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tkr_embed.models.base import DecodedImage, EmbedItem
from tkr_embed.models.qwen2_vl_image import Qwen2VLImageConfig, preprocess_image
from tkr_embed.models.registry import load_embedder, resolve_model_dir
from tkr_embed.models.tiny import make_tiny
from tests.correctness.reference import Qwen2VLReference, cosines

MAX_PIXELS = 256 * 28 * 28  # room for several aspect ratios without huge sequences


def image(w, h, seed):
    rng = np.random.default_rng(seed)
    # smooth structure plus noise: resizing then matters, as it does for photos
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 / max(w - 1, 1)), (yy * 255 / max(h - 1, 1)), ((xx + yy) % 64) * 4], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


IMAGES = {name: image(w, h, i) for i, (name, w, h) in enumerate([
    ("tiny", 12, 9), ("square", 224, 224), ("landscape", 640, 480), ("portrait", 300, 800),
    ("wide", 1200, 60), ("tall", 40, 900), ("odd", 333, 177)])}

ITEMS = [
    ("hello world", [], None),
    ("a much longer passage about embedding servers, batching, padding and caches " * 6, [], None),
    ("what is shown?", [], "Retrieve images that answer the question."),
    ("", [IMAGES["tiny"]], None),
    ("", [IMAGES["square"]], None),
    ("", [IMAGES["landscape"]], None),
    ("", [IMAGES["wide"]], None),
    ("a tall picture", [IMAGES["tall"]], None),
    ("a portrait", [IMAGES["portrait"]], "Represent this for retrieval."),
    ("two pictures", [IMAGES["odd"], IMAGES["square"]], None),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("parity") / "tiny-qwen2-vl", seed=3, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def reference(model_dir):
    return Qwen2VLReference(model_dir)


def to_items(specs):
    return [EmbedItem(text=t or None, images=tuple(DecodedImage(im, f"{id(im)}") for im in imgs), instruction=ins)
            for t, imgs, ins in specs]


def tkr_vectors(worker, model_dir, mode="none", dtype=None, batch=None):
    emb = worker.call(load_embedder, resolve_model_dir(str(model_dir)), mode).embedder
    if dtype is not None:
        import mlx.core as mx

        worker.call(lambda: emb.model.set_dtype(getattr(mx, dtype)))
    items = to_items(ITEMS)
    batch = batch or len(items)
    out = [worker.call(emb.forward, [emb.prepare(i) for i in items[k:k + batch]]) for k in range(0, len(items), batch)]
    v = np.concatenate(out)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def reference_vectors(reference):
    return reference.embed(ITEMS)


def test_float32_parity_text_image_fused_batched(worker, model_dir, reference_vectors, report):
    got = tkr_vectors(worker, model_dir)  # one right-padded batch of mixed lengths and modalities
    alone = tkr_vectors(worker, model_dir, batch=1)
    cos = cosines(got, reference_vectors)
    report["qwen2_vl_parity_float32"] = {"items": len(ITEMS), "mean_cosine": float(cos.mean()),
                                         "min_cosine": float(cos.min())}
    assert cos.min() >= 0.9999, dict(enumerate(cos.round(6)))
    assert cosines(alone, got).min() >= 0.9999


def test_bfloat16_parity(worker, model_dir, reference_vectors, report):
    got = tkr_vectors(worker, model_dir, dtype="bfloat16")
    cos = cosines(got, reference_vectors)
    report["qwen2_vl_parity_bfloat16"] = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
    assert cos.min() >= 0.999, dict(enumerate(cos.round(6)))


@pytest.mark.parametrize("mode", ["q8", "q4"])
def test_quantisation_error_is_reported(worker, model_dir, mode, report):
    ref = tkr_vectors(worker, model_dir)
    got = tkr_vectors(worker, model_dir, mode)
    cos = cosines(got, ref)
    report[f"qwen2_vl_tiny_{mode}_vs_float"] = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
    assert np.isfinite(got).all() and cos.mean() > 0.5  # random weights: reported, not held to MiniLM's floors


SIZES = [(1, 1), (5, 5), (12, 9), (28, 28), (29, 57), (224, 224), (640, 480), (480, 640), (1920, 1080),
         (3000, 20), (20, 3000), (4000, 3000), (333, 177)]


@pytest.mark.parametrize("min_pixels,max_pixels", [(4 * 28 * 28, 1280 * 28 * 28), (256 * 28 * 28, 1280 * 28 * 28),
                                                   (4 * 28 * 28, 64 * 28 * 28)])
def test_image_preprocessing_matches_transformers(min_pixels, max_pixels, report):
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    ref = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    cfg = Qwen2VLImageConfig(min_pixels=min_pixels, max_pixels=max_pixels)
    worst = 0.0
    for i, (w, h) in enumerate(SIZES):
        im = image(w, h, 100 + i)
        expected = ref(images=[im], return_tensors="np")
        mine, grid = preprocess_image(im, cfg)
        assert tuple(int(x) for x in expected["image_grid_thw"][0]) == grid, (w, h)
        diff = float(np.abs(expected["pixel_values"] - mine).max())
        worst = max(worst, diff)
        assert diff <= 1e-5, (w, h, diff)
    report.setdefault("image_preprocessing_max_abs_diff", {})[f"{min_pixels}-{max_pixels}"] = worst


def test_checkpoint_saved_by_transformers_loads_and_matches(worker, model_dir, reference_vectors, tmp_path, report):
    """A checkpoint that transformers >= 5 saved (text_config with rope_parameters, a vision tower
    typed qwen2_vl_vision, model.language_model.* keys) loads and gives the same vectors."""
    import shutil

    saved = tmp_path / "saved-by-transformers"
    reference_model = Qwen2VLReference(model_dir).model
    reference_model.save_pretrained(saved)  # Qwen2VLModel: keys without the "model." prefix
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
        shutil.copy(model_dir / name, saved / name)
    cfg = json.loads((saved / "config.json").read_text())
    assert "rope_parameters" in cfg.get("text_config", cfg) and cfg["vision_config"]["model_type"] == "qwen2_vl_vision"
    ours = tkr_vectors(worker, saved)
    cos = cosines(ours, reference_vectors)
    report["qwen2_vl_transformers_saved"] = {"items": len(ITEMS), "min_cosine": float(cos.min())}
    assert cos.min() >= 0.9999, dict(enumerate(cos.round(6)))
