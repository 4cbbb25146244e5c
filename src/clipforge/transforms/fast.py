"""The fast training path: `FastTrainTransform` (see its docstring), `TrainTransform`'s crops computed
with less work from undecoded bytes (`EncodedImage`), returning uint8 (3, S, S).

Its pieces: JPEG decoding at reduced scale (from `images`), torch's antialiased uint8 resize kernel in
place of PIL's, and `_resize_plan`, which places torch's kernel on PIL's `resize(box=...)` geometry.
Training only; evaluation keeps the exact `standard.EvalTransform`.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .config import PreprocessConfig, _as_config
from .images import ImageLoadError, dct_scale, decode_upright, exif_orientation, open_image, to_rgb
from .standard import TrainTransform, _prepare


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes, not yet decoded (a shard member): what `FastTrainTransform` decodes at
    reduced scale. `name` is what errors call it ("shard.tar:key.jpg")."""

    data: bytes
    name: str


# torch's antialiased uint8 resize (aten::_upsample_{bilinear,bicubic}2d_aa, the kernels torchvision's
# tensor Resize uses) computes PIL's filter (same support, same bicubic a=-0.5, same weight rounding to
# within 2 levels of 255) ~4x faster than PIL on one core (~2.7x with the copies out of PIL). These two only.
_TORCH_AA = {"bicubic": "_upsample_bicubic2d_aa", "bilinear": "_upsample_bilinear2d_aa"}
# Margin (in output pixels) kept around the crop when resizing with torch; see `_resize_plan`.
_MARGINS = range(2, 10)


def _resize_plan(a0: float, a1: float, length: int, n: int) -> tuple[int, int, int, int, float]:
    """One axis of resizing the span [a0, a1) of `length` pixels to n outputs with torch's kernel.

    PIL's `resize(box=...)` puts output i's centre at a0 + (i + 0.5) * s (s = (a1 - a0) / n) and reads
    pixels outside the box; torch's kernel starts at a whole pixel r0, its centres at r0 + (j + 0.5) * s.
    So torch resizes [r0, end) to m + n outputs and keeps outputs m..m+n-1, the margin m (2-9 outputs, so
    the filter's support of 2 outputs when shrinking stays inside) chosen to bring r0 = a0 - m * s nearest
    a whole pixel: the crop lands within 0.5 px of PIL's, 0.04 px at the median (0.14 at the 90th
    percentile; the worst where s is near a whole number). Where the margin would start before the
    image, the missing rows are edge copies (`pad`). A span from the image's first pixel needs no margin
    (m = 0): PIL clamps the filter there too.

    Returns (first pixel read, end, pad at the start, m, s).
    """
    s = (a1 - a0) / n
    if a0 == 0:
        m, r0 = 0, 0
    else:
        inside = [(abs(a0 - m * s - round(a0 - m * s)), m) for m in _MARGINS if round(a0 - m * s) >= 0]
        best = min(inside) if inside else (1.0, 0)
        if best[0] > 0.1:  # no good start inside the image: allow starts before it (edge-padded)
            best = min((abs(a0 - m * s - round(a0 - m * s)), m) for m in _MARGINS)
        m = best[1]
        r0 = round(a0 - m * s)
    end = min(length, r0 + math.ceil((m + n + 2) * s) + 1)  # the last kept output's support, clamped
    return max(r0, 0), end, max(-r0, 0), m, s


@functools.cache
def _torch_aa_kernel(interpolation: str) -> Callable[..., torch.Tensor] | None:
    """torch's antialiased uint8 resize for a filter, or None where this torch lacks it (then PIL)."""
    name = _TORCH_AA.get(interpolation)
    kernel = getattr(torch.ops.aten, name).default if name and hasattr(torch.ops.aten, name) else None
    if kernel is None:
        return None
    try:
        kernel(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), [2, 2], False, 0.5, 0.5)
    except (RuntimeError, NotImplementedError):  # no uint8 support in this build
        return None
    return kernel


class FastTrainTransform(TrainTransform):
    """The training crop of `TrainTransform`, computed with less work; returns uint8 (3, S, S).

    Same random draws (same calls, same order, hence the same crop box in the upright source image for the
    same RNG state), then three shortcuts, all for training only (evaluation keeps `EvalTransform`):
    - JPEGs are decoded at 1/2 or 1/4 scale inside the decoder (PIL `draft`: libjpeg's DCT scaling)
      when the crop box still has at least S pixels a side at that scale, i.e. the bicubic resize that
      follows still shrinks; a 600 px photo cropped to 224 px decodes at 1/2, to 64 px at 1/4;
    - only the crop box is resized, never the whole image, straight into a uint8 tensor with torch's
      antialiased resize kernel (PIL's bicubic/bilinear filter computed ~2.7x faster; the crop's geometry
      is PIL's `Image.resize(box=...)`'s within 0.5 px, 0.04 px at the median, see `_resize_plan`); other
      filters, crops smaller than S (enlarged), or a torch without that kernel use PIL's `resize(box=...)`;
    - no float conversion or normalisation: the batch stays uint8 (4x less to copy between worker
      processes, to pin and to send to the GPU) and the step normalises on the device
      (`normalise_uint8`, called by `contrastive_step` for uint8 images).
    The pixels differ from the exact path's by the decoder's scaling and the resize filter's edge
    handling: on noisy photo-like JPEGs a mean absolute difference of ~1.5 of 255 (PSNR ~37 dB) at 224 px
    and ~3 (PSNR ~31 dB) at 64 px (tests/test_fast_transform.py holds the bounds: <= 2.5 levels and
    >= 35 dB at 224 px, <= 4.5 and >= 31 dB at 64 px); what a model trains on is the same crop of the
    same image, resized with the same filter.

    Input: an `EncodedImage` (decoded here; errors are `ImageLoadError` naming it) or a PIL image
    (already decoded: only the box resize and the uint8 output apply).
    """

    accepts_encoded = True  # data streams hand it undecoded bytes (WebDatasetPairs.lazy_images)

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in the upright source image, drawn exactly as TrainTransform does."""
        n = self.image_size
        if self.mode == "square_crop":
            # TrainTransform: resize the short side to n (torchvision's int() rounding), crop n x n
            new_w, new_h = (n, int(n * height / width)) if width <= height else (int(n * width / height), n)
            top, left = self._randint(new_h - n + 1), self._randint(new_w - n + 1)
            sx, sy = width / new_w, height / new_h
            return left * sx, top * sy, (left + n) * sx, (top + n) * sy
        top, left, h, w = self.crop_params(width, height)
        return float(left), float(top), float(left + w), float(top + h)

    def __call__(self, image: EncodedImage | Image.Image) -> torch.Tensor:
        if isinstance(image, EncodedImage):
            img, box = self.decode(image)
        else:
            img = _prepare(image)
            box = self.box(*img.size)
        return self.crop_resize(img, box)

    # The two stages, separately callable so benchmarks/input_pipeline.py times the code that runs.
    def decode(self, enc: EncodedImage) -> tuple[Image.Image, tuple[float, float, float, float]]:
        """(upright image decoded at the scale the crop allows, the crop box in its pixels)."""
        n = self.image_size
        with open_image(io.BytesIO(enc.data), name=enc.name) as img:
            try:
                orientation = exif_orientation(img)
                w, h = img.size
                uw, uh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # 5-8 swap the axes
                box = self.box(uw, uh)
                side = min(box[2] - box[0], box[3] - box[1])  # the crop's short side, source pixels
                up = decode_upright(img, dct_scale(side, n), orientation)
            except Exception as e:
                raise ImageLoadError(f"cannot decode image file {enc.name}: {type(e).__name__}: {e}") from e
        rx, ry = up.size[0] / uw, up.size[1] / uh  # the decoded scale (1/k, up to rounding)
        return _prepare(up), (box[0] * rx, box[1] * ry, box[2] * rx, box[3] * ry)

    def crop_resize(self, img: Image.Image, box: tuple[float, float, float, float]) -> torch.Tensor:
        """The crop box resized to S x S (bicubic by default) as uint8 (3, S, S): only the box's pixels
        (and the filter's margin) are read."""
        n, img = self.image_size, to_rgb(img)
        kernel = _torch_aa_kernel(self.config.interpolation)
        if kernel is None or min(box[2] - box[0], box[3] - box[1]) < n:
            # enlarging (a crop smaller than S: small images) reads 2 pixels around each output, more
            # than `_resize_plan`'s margin; rare in training, so PIL does it
            arr = np.array(img.resize((n, n), self._resample, box=box), dtype=np.uint8)
            return torch.from_numpy(arr).permute(2, 0, 1)  # a (3, S, S) view; the batch's stack copies
        x0, x1, px, mx, sx = _resize_plan(box[0], box[2], img.size[0], n)
        y0, y1, py, my, sy = _resize_plan(box[1], box[3], img.size[1], n)
        # The region as RGBX, PIL's own 4-byte pixels (a row copy, no packing), which torch's kernel would
        # otherwise unpack RGB into; read-only bytes, which the kernel only reads
        region = img.crop((x0, y0, x1, y1))
        pixels = np.frombuffer(region.tobytes("raw", "RGBX"), np.uint8).reshape(*region.size[::-1], 4)
        if px or py:  # edge copies before the first row/column (cheaper than torch's replicate pad)
            padded = np.empty((pixels.shape[0] + py, pixels.shape[1] + px, 4), np.uint8)
            padded[py:, px:] = pixels
            padded[:py, px:] = pixels[:1]
            padded[:, :px] = padded[:, px : px + 1]
            pixels = padded
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's warning about a read-only array
            x = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # (1, 4, h, w), channels-last memory
        out = kernel(x, [my + n, mx + n], False, 1 / sy, 1 / sx)
        return out[0, :3, my:, mx:]

    def __repr__(self) -> str:
        return (
            f"FastTrainTransform({self.config}, mode={self.mode!r}, scale={self.scale}, ratio={self.ratio})"
        )


def fast_train_transform(
    cfg_or_size: PreprocessConfig | int,
    mode: str = "square_crop",
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> FastTrainTransform:
    """`train_transform`'s crops, JPEGs decoded at reduced scale, uint8 output (see FastTrainTransform)."""
    return FastTrainTransform(_as_config(cfg_or_size), mode, scale, ratio, generator)
