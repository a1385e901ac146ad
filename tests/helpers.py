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
