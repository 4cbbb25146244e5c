"""Reading image files: header checks (pixel count, aspect) before any pixel is decoded, full decoding,
EXIF rotation, conversion of any PIL mode to RGB, and the reduced-scale JPEG decoding (libjpeg's DCT
scaling) that `load_image_reduced` and the fast training path (`fast.FastTrainTransform`) share.

Every failure is an `ImageLoadError` naming the file (a missing path is FileNotFoundError).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL warns above Image.MAX_IMAGE_PIXELS (89.5M) and refuses above twice that; we refuse with our own
# error at PIL's hard limit by default (a 13k x 13k photo still loads).
DEFAULT_MAX_PIXELS = 2 * 89_478_485
# Resizing the short side to S makes the long side S x aspect: a 1 x 1,000,000 PNG (1 KB) would cost
# gigabytes. Longer than 50:1 is refused by default (panoramas are ~4-10:1, banners rarely past 20:1).
DEFAULT_MAX_ASPECT = 50.0


class ImageLoadError(ValueError):
    """An image file that cannot be read, decoded or converted (the message names the file)."""


# ----------------------------------------------------------------------------------------------------
# loading and mode conversion


def _name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", None) or f"<{type(source).__name__} object>")


def _sixteen_bit_to_rgb(values: np.ndarray) -> Image.Image:
    """(H, W) integers in [0, 65535] -> RGB, scaled (not clipped) so 65535 -> 255, rounded."""
    v = np.clip(values.astype(np.int64), 0, 65535)
    gray = ((v * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(gray), mode="L").convert("RGB")


def to_rgb(img: Image.Image, background: tuple[int, int, int] | None = None) -> Image.Image:
    """Convert any PIL mode to RGB.

    Alpha (RGBA, LA, PA, palette transparency): with `background=None` it is dropped, as OpenAI's
    `.convert("RGB")` does (eval parity); with an RGB colour the image is composited onto it.
    16-bit ("I;16*") and 32-bit ("I", assumed to hold 16-bit data as PIL gives for 16-bit PNG/TIFF)
    are scaled by 255/65535; float ("F") is taken as [0, 1]. Other modes use PIL's conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_rgb(np.asarray(img))
    if mode == "F":
        v = np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0)
        return Image.fromarray(np.rint(v * 255).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        if background is None:
            return rgba.convert("RGB")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def _bomb_message(name: str, pil_message: str, max_pixels: int | None) -> str:
    """PIL refuses past 2 x Image.MAX_IMAGE_PIXELS before the header check below can run: say which limit
    applies, ours when it is the lower one (PIL's message quotes only its own)."""
    pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    found = re.search(r"\((\d+) pixels\)", pil_message)
    size = f"{found.group(1)} pixels" if found else f"more than {pil_limit} pixels"
    if max_pixels is not None and max_pixels < pil_limit:
        return f"image {name} is {size}, above max_pixels={max_pixels} (possible decompression bomb)"
    return (
        f"image {name} is {size}, above PIL's limit of {pil_limit} pixels (2 x Image.MAX_IMAGE_PIXELS; "
        "possible decompression bomb)"
    )


def open_image(
    source: str | os.PathLike | IO[bytes],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_aspect: float | None = DEFAULT_MAX_ASPECT,
    name: str | None = None,
) -> Image.Image:
    """Open an image file and check its header (size, aspect) without decoding any pixel: `load_image`'s
    first half, and what the fast training path decodes at reduced scale (`FastTrainTransform`)."""
    name = name or _name(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"image file not found: {name}")
        if path.is_dir():
            raise ImageLoadError(f"expected an image file, got a directory: {name}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
    except Image.DecompressionBombError as e:
        raise ImageLoadError(_bomb_message(name, str(e), max_pixels)) from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"cannot identify image file {name}: not an image or unsupported format") from e
    except Exception as e:
        raise ImageLoadError(f"cannot open image file {name}: {type(e).__name__}: {e}") from e
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise ImageLoadError(
            f"image {name} is {w}x{h} = {w * h} pixels, above max_pixels={max_pixels} "
            "(possible decompression bomb); pass a larger max_pixels to load it"
        )
    if max_aspect is not None and max(w, h) > max_aspect * max(1, min(w, h)):
        img.close()
        raise ImageLoadError(
            f"image {name} is {w}x{h}, more than {max_aspect:g}:1; resizing it would cost "
            f"{max(w, h) / max(1, min(w, h)):.0f}x a square image's pixels (pass a larger max_aspect)"
        )
    return img


def load_image(
    source: str | os.PathLike | IO[bytes],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] | None = None,
    max_aspect: float | None = DEFAULT_MAX_ASPECT,
    name: str | None = None,
) -> Image.Image:
    """Open, fully decode, EXIF-rotate and convert an image file to RGB.

    `name` is what errors call the image when `source` is a file object (e.g. "shard.tar:key.jpg");
    a path names itself.

    Raises FileNotFoundError for a missing path and ImageLoadError (naming the file) for anything that
    is not a decodable image: unknown format, truncated data, or more than `max_pixels` pixels
    (decompression-bomb guard; None disables ours, PIL's own hard limit still applies), or a long side
    more than `max_aspect` times the short side (checked from the header, before any pixel is decoded).
    """
    with open_image(source, max_pixels=max_pixels, max_aspect=max_aspect, name=name) as img:
        name = name or _name(source)
        try:
            img.load()  # decode now: truncated or corrupt data fails here, not in a worker later
            upright = ImageOps.exif_transpose(img)
            return to_rgb(upright, background)
        except Exception as e:
            raise ImageLoadError(f"cannot decode image file {name}: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------------
# reduced-scale decoding (JPEG DCT scaling)

# JPEG decoders scale by 1/2, 1/4 or 1/8 inside the inverse DCT (libjpeg's scale_denom; PIL `draft`). 1/8
# is the DC coefficient alone (8x8 block means): 2-3x the pixel error of 1/4 at 64 px, so it is not used.
_DCT_SCALES = (4, 2, 1)


def dct_scale(side: float, target: int) -> int:
    """The largest JPEG DCT scale-down (4 or 2, else 1) that leaves `side` source pixels at least `target`
    decoded pixels, so the bicubic resize to `target` that follows still shrinks."""
    return next(k for k in _DCT_SCALES if side / k >= target or k == 1)


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1: upright, 5-8: the axes are swapped), read from the header."""
    return int(img.getexif().get(0x0112, 1))


def decode_upright(img: Image.Image, k: int, orientation: int) -> Image.Image:
    """Decode an opened image, a JPEG at 1/k scale inside the decoder (PIL `draft`, libjpeg's DCT
    scaling; other formats at full size), and turn it upright (no copy when it already is)."""
    if k > 1 and img.format == "JPEG":
        w, h = img.size
        img.draft(img.mode, (w // k, h // k))
    img.load()
    return ImageOps.exif_transpose(img) if orientation in range(2, 9) else img


def load_image_reduced(
    source: str | os.PathLike | IO[bytes],
    min_side: int,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] | None = None,
    max_aspect: float | None = DEFAULT_MAX_ASPECT,
    name: str | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """`load_image` for a model whose eval transform resizes the short side to `min_side`: a JPEG is
    decoded at the smallest DCT scale (1/4, 1/2) whose short side is still >= `min_side`, the resize then
    starts from far fewer pixels. The pixels differ from `load_image`'s (the decoder's scaling instead of
    the bicubic filter over the full image), so this is opt-in. Returns the RGB image and the
    full-resolution upright (width, height), what metadata should record."""
    with open_image(source, max_pixels=max_pixels, max_aspect=max_aspect, name=name) as img:
        name = name or _name(source)
        try:
            orientation = exif_orientation(img)
            w, h = img.size
            size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
            k = dct_scale(min(w, h), min_side) if img.format == "JPEG" else 1
            return to_rgb(decode_upright(img, k, orientation), background), size
        except Exception as e:
            raise ImageLoadError(f"cannot decode image file {name}: {type(e).__name__}: {e}") from e
