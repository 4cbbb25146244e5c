"""Uploaded images: base64 or multipart bytes -> a checked RGB image, with the request's limits.

`transforms.load_image` does the guarding (pixel count and aspect from the header, before decoding;
truncated data; unknown formats); this module turns its errors into 4xx answers naming the upload.
"""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

from ..transforms import ImageLoadError, load_image, load_image_reduced
from .config import ServeConfig
from .errors import ApiError


def decode_base64(value: object, name: str) -> bytes:
    """Standard base64, optionally as a `data:image/...;base64,` URL."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, "bad_image", f"{name}: expected a base64 string")
    if value.startswith("data:"):
        head, _, value = value.partition(",")
        if not head.endswith(";base64"):
            raise ApiError(400, "bad_image", f"{name}: a data URL must be base64-encoded")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "bad_image", f"{name}: not valid base64 ({e})") from None


def open_upload(
    data: bytes, name: str, cfg: ServeConfig, reduced_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """(decoded, EXIF-rotated RGB image, its full upright (width, height)), or a 4xx naming `name` and what
    is wrong. `reduced_side`: decode a JPEG at reduced scale down to that short side, as `embed
    --fast-decode` did (`load_image_reduced`), for uploads added to an index made that way."""
    if not data:
        raise ApiError(400, "bad_image", f"{name}: empty file")
    if len(data) > cfg.max_upload_bytes:
        raise ApiError(
            413, "too_large", f"{name}: {len(data)} bytes, above the limit of {cfg.max_upload_bytes}"
        )
    try:
        limits = {"max_pixels": cfg.max_pixels, "max_aspect": cfg.max_aspect}
        if reduced_side is not None:
            return load_image_reduced(io.BytesIO(data), reduced_side, **limits)
        img = load_image(io.BytesIO(data), **limits)
        return img, img.size
    except ImageLoadError as e:
        msg = str(e).replace("<BytesIO object>", name)
        too_big = "max_pixels" in msg or "MAX_IMAGE_PIXELS" in msg or "max_aspect" in msg
        if too_big:
            raise ApiError(413, "image_too_large", msg) from None
        raise ApiError(400, "bad_image", msg) from None
    except (OSError, ValueError, MemoryError) as e:  # anything else PIL raises on hostile input
        raise ApiError(400, "bad_image", f"{name}: cannot decode: {type(e).__name__}: {e}") from None


def thumbnail_jpeg(img: Image.Image, size: int) -> bytes:
    """A JPEG whose long side is at most `size` pixels."""
    img = img.copy()
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()
