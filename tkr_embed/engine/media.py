"""Image intake: bytes -> validated RGB image with a digest of its pixels.

Checks, in order: byte size, a readable header in an allowed format, the pixel count *before*
decoding (decompression bombs), a full decode, EXIF orientation, conversion to RGB.
Pure CPU work; it runs in the thread pool, never on the MLX worker.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from ..models.base import DecodedImage


class ImageError(ValueError):
    """An image was rejected; `status` is the HTTP status that fits (400, 413 or 415)."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_image"):
        super().__init__(message)
        self.status = status
        self.code = code


_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


def decode_base64_image(value: str, max_bytes: int) -> bytes:
    """Accept raw base64 or a data: URI; return the bytes (size-checked before decoding fully)."""
    m = _DATA_URI.match(value)
    if m:
        if not m.group("b64"):
            raise ImageError("data: URIs must be base64-encoded (data:image/png;base64,...)")
        payload = value[m.end():]
    else:
        payload = value
    payload = payload.strip()
    # base64 expands 3 bytes into 4 characters: reject oversized input before allocating it.
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageError(f"image is larger than the limit of {max_bytes} bytes", status=413, code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image is not valid base64 (or a data:image/...;base64 URI)") from None
    if len(data) > max_bytes:
        raise ImageError(f"image is larger than the limit of {max_bytes} bytes", status=413, code="image_too_large")
    return data


def decode_image(data: bytes, max_bytes: int, max_pixels: int, allowed_formats: list[str]) -> DecodedImage:
    if not data:
        raise ImageError("image is empty")
    if len(data) > max_bytes:
        raise ImageError(f"image is larger than the limit of {max_bytes} bytes", status=413, code="image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=None)
    except UnidentifiedImageError:
        raise ImageError(
            f"data is not an image in a supported format ({', '.join(allowed_formats)})",
            status=415, code="unsupported_image_format",
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image has more than the limit of {max_pixels} pixels", status=413, code="image_too_large") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad upload
        raise ImageError(f"image could not be read: {type(e).__name__}") from None
    fmt = (img.format or "").upper()
    if fmt not in allowed_formats:
        raise ImageError(
            f"image format {fmt or 'unknown'} is not accepted; allowed: {', '.join(allowed_formats)}",
            status=415, code="unsupported_image_format",
        )
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError("image has no pixels")
    if w * h > max_pixels:
        raise ImageError(
            f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}", status=413, code="image_too_large"
        )
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            # Composite transparency on white rather than black: what a viewer shows.
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                bg = Image.new("RGB", rgba.size, (255, 255, 255))
                bg.paste(rgba, mask=rgba.getchannel("A"))
                img = bg
            else:
                img = img.convert("RGB")
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt pixel data
        raise ImageError(f"image data is corrupt or truncated ({type(e).__name__})") from None
    digest = hashlib.sha256(f"{img.mode}:{img.size}".encode() + img.tobytes()).hexdigest()
    return DecodedImage(image=img, digest=digest)
