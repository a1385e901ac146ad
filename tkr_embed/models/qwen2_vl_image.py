"""Qwen2-VL image preprocessing in NumPy: smart resize, rescale, normalise, patchify.

This reproduces transformers' Qwen2VLImageProcessor (the slow, PIL-based one) so that the
pixel_values and image_grid_thw the vision tower sees match the reference implementation.
It is pure CPU work and never touches MLX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# OpenAI CLIP statistics, as in Qwen2-VL's preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


class ImageShapeError(ValueError):
    """The image cannot be resized under Qwen2-VL's rules (e.g. aspect ratio above 200)."""


@dataclass(frozen=True)
class Qwen2VLImageConfig:
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 1280 * 28 * 28
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_preprocessor_config(cls, cfg: dict, **override) -> "Qwen2VLImageConfig":
        size = cfg.get("size") or {}
        values = dict(
            min_pixels=cfg.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels,
            max_pixels=cfg.get("max_pixels") or size.get("longest_edge") or cls.max_pixels,
            patch_size=cfg.get("patch_size", cls.patch_size),
            merge_size=cfg.get("merge_size", cls.merge_size),
            temporal_patch_size=cfg.get("temporal_patch_size", cls.temporal_patch_size),
            image_mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            image_std=tuple(cfg.get("image_std", CLIP_STD)),
        )
        values.update({k: v for k, v in override.items() if v is not None})
        if values["min_pixels"] > values["max_pixels"]:
            raise ValueError(f"min_pixels {values['min_pixels']} exceeds max_pixels {values['max_pixels']}")
        return cls(**values)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: both sides multiples of `factor`, area within [min, max], aspect kept."""
    if max(height, width) / max(1, min(height, width)) > MAX_ASPECT_RATIO:
        raise ImageShapeError(
            f"image aspect ratio must be at most {MAX_ASPECT_RATIO}:1, got {width}x{height}"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_patches(image: Image.Image, cfg: Qwen2VLImageConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RGB PIL image -> (its resized pixels as patches, uint8 [t*h*w, C*P*P], one frame; grid (t, h, w)).

    What a request carries to the model: 1/8 of the bytes of the float32 pixel values (one frame
    instead of temporal_patch_size copies, bytes instead of floats), so a 448-pixel image crosses
    the engine link and reaches the device as 0.6 MB instead of 4.8. Rescaling, normalising and
    the frame copies happen on the device (normalize_patches with xp=mlx.core), numbers
    identical to preprocess_image's."""
    width, height = image.size
    rh, rw = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if (rw, rh) != (width, height):
        image = image.resize((rw, rh), resample=Image.BICUBIC)
    arr = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # C, H, W
    c = arr.shape[0]
    p, m = cfg.patch_size, cfg.merge_size
    gt, gh, gw = 1, rh // p, rw // p
    # Patches in the vision tower's order: merge windows row by row, then within each window.
    patches = arr.reshape(gt, c, gh // m, m, p, gw // m, m, p).transpose(0, 2, 5, 3, 6, 1, 4, 7)
    return np.ascontiguousarray(patches.reshape(gt * gh * gw, c * p * p)), (gt, gh, gw)


def _scale_and_shift(cfg: Qwen2VLImageConfig) -> tuple[np.ndarray, np.ndarray]:
    """x * scale + shift == (x / 255 - mean) / std, per channel."""
    std = np.asarray(cfg.image_std, dtype=np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    return (np.float32(1.0 / 255.0) / std), (-mean / std)


def normalize_patches(patches: np.ndarray, cfg: Qwen2VLImageConfig, xp=np):
    """uint8 patches [n, C*P*P] -> the vision tower's float32 input [n, C*T*P*P] (xp: numpy, or
    mlx.core on the worker): rescaled, normalised per channel, each frame repeated T times."""
    n = patches.shape[0]
    c = len(cfg.image_mean)
    pp = cfg.patch_size * cfg.patch_size
    scale, shift = (xp.array(a).reshape(1, c, 1, 1) for a in _scale_and_shift(cfg))
    x = patches.reshape(n, c, 1, pp).astype(xp.float32) * scale + shift
    x = xp.broadcast_to(x, (n, c, cfg.temporal_patch_size, pp))
    return x.reshape(n, c * cfg.temporal_patch_size * pp)


def preprocess_image(image: Image.Image, cfg: Qwen2VLImageConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RGB PIL image -> (flattened patches float32 [t*h*w, C*T*P*P], grid (t, h, w)): the
    reference processor's pixel_values (tests/correctness compares them)."""
    patches, grid = image_patches(image, cfg)
    return np.ascontiguousarray(normalize_patches(patches, cfg), dtype=np.float32), grid


def num_image_tokens(grid: tuple[int, int, int], merge_size: int) -> int:
    t, h, w = grid
    return t * h * w // (merge_size * merge_size)
