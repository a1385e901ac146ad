import numpy as np
import pytest
from PIL import Image

from tkr_embed.models.qwen2_vl_image import (
    ImageShapeError, Qwen2VLImageConfig, num_image_tokens, preprocess_image, smart_resize,
)

MIN, MAX = 4 * 28 * 28, 1280 * 28 * 28


@pytest.mark.parametrize("h,w", [(1, 1), (20, 3000), (28, 28), (224, 224), (480, 640), (4000, 3000), (50, 9000)])
def test_smart_resize_rules(h, w):
    rh, rw = smart_resize(h, w, 28, MIN, MAX)
    assert rh % 28 == 0 and rw % 28 == 0
    assert MIN <= rh * rw <= MAX
    if min(h, w) >= 28 and h * w <= MAX:
        # aspect ratio kept within rounding to multiples of 28
        assert abs(rh / rw - h / w) <= 28 / min(rh, rw) * (h / w) + 1e-9


def test_extreme_aspect_ratio_is_rejected():
    with pytest.raises(ImageShapeError, match="aspect ratio"):
        smart_resize(10, 2500, 28, MIN, MAX)


def test_patches_and_grid():
    cfg = Qwen2VLImageConfig(min_pixels=MIN, max_pixels=64 * 28 * 28)
    img = Image.fromarray(np.zeros((100, 150, 3), np.uint8))
    patches, grid = preprocess_image(img, cfg)
    t, gh, gw = grid
    assert t == 1 and gh % 2 == 0 and gw % 2 == 0
    assert patches.shape == (gh * gw, 3 * 2 * 14 * 14) and patches.dtype == np.float32
    assert num_image_tokens(grid, 2) == gh * gw // 4
    # a black image normalises to -mean/std in every channel
    expected = -np.asarray(cfg.image_mean) / np.asarray(cfg.image_std)
    per_channel = patches.reshape(-1, 3, 2 * 14 * 14).mean(axis=(0, 2))
    np.testing.assert_allclose(per_channel, expected, rtol=1e-5)


def test_patch_layout_keeps_channels_and_positions():
    """A patch holds one 14x14 region: a left-red/right-blue image gives red then blue patches."""
    cfg = Qwen2VLImageConfig(min_pixels=56 * 56, max_pixels=56 * 56)
    arr = np.zeros((56, 56, 3), np.uint8)
    arr[:, :28, 0] = 255
    arr[:, 28:, 2] = 255
    patches, grid = preprocess_image(Image.fromarray(arr), cfg)
    assert grid == (1, 4, 4)
    per = patches.reshape(16, 3, 2, 14, 14)
    red = per[:, 0].mean(axis=(1, 2, 3)) > 0
    # merge order: 2x2 blocks row-major; block (0,0) and (1,0) are left (red), (0,1),(1,1) right (blue)
    assert red.tolist() == [True] * 4 + [False] * 4 + [True] * 4 + [False] * 4


def test_uint8_patches_normalised_on_mlx_equal_the_float_pixels(worker):
    # Requests carry uint8 patches (1/8 of the bytes); the worker rescales, normalises and copies
    # the frames with MLX. It must hand the tower what the reference-matching float path does.
    from tkr_embed.models.qwen2_vl_image import image_patches, normalize_patches

    cfg = Qwen2VLImageConfig(min_pixels=MIN, max_pixels=64 * 28 * 28)
    rng = np.random.default_rng(3)
    img = Image.fromarray((rng.random((90, 130, 3)) * 255).astype(np.uint8))
    raw, grid = image_patches(img, cfg)
    expected, grid2 = preprocess_image(img, cfg)
    assert raw.dtype == np.uint8 and grid == grid2 and raw.nbytes * 8 == expected.nbytes

    def on_mlx(patches):
        import mlx.core as mx

        return np.array(normalize_patches(mx.array(patches), cfg, xp=mx))

    np.testing.assert_allclose(worker.call(on_mlx, raw), expected, atol=1e-6)
