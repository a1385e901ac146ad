"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tkr_embed.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]


def make_settings(model_path: str, **overrides) -> Settings:
    """Test settings: the dev config with a model and any dotted overrides."""
    ov = {"model.path": model_path, "model.quantization": "none", "logging.level": "WARNING"}
    ov.update(overrides)
    return load_settings(ROOT / "config.dev.yaml", env={}, overrides=ov)


def png_bytes(w: int, h: int, seed: int = 0, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = (rng.random((h, w, channels)) * 255).astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def decoded_png(seed: int, w: int = 56, h: int = 84):
    """A decoded random image, as the API hands it to the engine."""
    from tkr_embed.engine.media import decode_image

    return decode_image(png_bytes(w, h, seed), 10**8, 10**9, ["PNG"])


def mixed_multimodal_items():
    """Text only, image only, text + image, a long text, two images in one item: the item kinds a
    Qwen2-VL batch mixes, with different lengths and image sizes."""
    from tkr_embed.models.base import EmbedItem

    return [
        EmbedItem(text="a short query"),
        EmbedItem(images=(decoded_png(1),)),
        EmbedItem(text="a caption with its picture", images=(decoded_png(2, 112, 56),)),
        EmbedItem(text="a much longer passage about local embedding servers " * 4),
        EmbedItem(images=(decoded_png(3), decoded_png(4, 28, 28))),
    ]


def forward_each_alone(worker, emb, prepared) -> np.ndarray:
    """The embedder's vectors for each prepared item in a batch of its own (the reference that
    sharded, bucketed or compiled batches must reproduce)."""
    return np.concatenate([worker.call(emb.forward, [p]) for p in prepared])
