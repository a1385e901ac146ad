import base64
import io

import numpy as np
import pytest
from PIL import Image

from tkr_embed.engine.media import ImageError, decode_base64_image, decode_image
from tests.helpers import png_bytes

FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]


def dec(data, max_bytes=10**7, max_pixels=10**7, formats=FORMATS):
    return decode_image(data, max_bytes, max_pixels, formats)


def test_png_decodes_to_rgb_with_stable_digest():
    a, b = dec(png_bytes(30, 20)), dec(png_bytes(30, 20))
    assert a.image.mode == "RGB" and a.size == (30, 20)
    assert a.digest == b.digest and a.digest != dec(png_bytes(30, 20, seed=1)).digest


def test_same_pixels_in_another_format_share_the_digest():
    img = Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8))
    p, b = io.BytesIO(), io.BytesIO()
    img.save(p, "PNG")
    img.save(b, "BMP")
    assert dec(p.getvalue()).digest == dec(b.getvalue()).digest  # lossless: same decoded pixels


@pytest.mark.parametrize("data,status", [
    (b"", 400),
    (b"definitely not an image", 415),
    (png_bytes(20, 20)[:60], 400),  # truncated PNG: header ok, pixel data cut
])
def test_bad_data(data, status):
    with pytest.raises(ImageError) as e:
        dec(data)
    assert e.value.status == status


def test_format_allowlist():
    with pytest.raises(ImageError) as e:
        dec(png_bytes(10, 10, fmt="BMP"), formats=["PNG"])
    assert e.value.status == 415 and "BMP" in str(e.value)


def test_byte_and_pixel_limits():
    data = png_bytes(100, 100)
    with pytest.raises(ImageError) as e:
        dec(data, max_bytes=len(data) - 1)
    assert e.value.status == 413
    with pytest.raises(ImageError) as e:
        dec(data, max_pixels=100 * 100 - 1)
    assert e.value.status == 413 and "pixels" in str(e.value)


def test_decompression_bomb_is_refused_before_decoding():
    # 30000 x 30000 of one colour compresses to a few hundred KB but would need 2.7 GB decoded.
    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, "PNG")
    with pytest.raises(ImageError) as e:
        dec(buf.getvalue(), max_bytes=10**8, max_pixels=40_000_000)
    assert e.value.status == 413


def test_exif_orientation_is_applied():
    img = Image.fromarray(np.zeros((10, 30, 3), np.uint8))  # 30 wide, 10 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert dec(buf.getvalue()).size == (10, 30)


def test_transparency_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    out = np.asarray(dec(buf.getvalue()).image)
    assert (out == 255).all()


def test_base64_and_data_uris():
    raw = png_bytes(5, 5)
    b64 = base64.b64encode(raw).decode()
    assert decode_base64_image(b64, 10**6) == raw
    assert decode_base64_image("data:image/png;base64," + b64, 10**6) == raw
    with pytest.raises(ImageError):
        decode_base64_image("data:image/png," + b64, 10**6)  # not base64-flagged
    with pytest.raises(ImageError):
        decode_base64_image("!!!not base64!!!", 10**6)
    with pytest.raises(ImageError) as e:
        decode_base64_image(b64, 10)
    assert e.value.status == 413
