"""Image loading and preprocessing (PIL + torch, no torchvision).

Eval is OpenAI's `_transform(n)`: Resize(n, bicubic) on the short side, CenterCrop(n), RGB, ToTensor,
Normalize(OPENAI_MEAN, OPENAI_STD), reproduced with torchvision's rounding rules so the pixels are the
same as OpenAI's. Train is either the paper's only augmentation (resize the short side, random square
crop) or OpenCLIP's default RandomResizedCrop(n, scale=(0.9, 1.0)) with torchvision's algorithm.

Randomness: train transforms draw from torch's global RNG by default, with the same calls as
torchvision (so `torch.manual_seed` reproduces torchvision's crops). DataLoader seeds torch's RNG
differently in every worker (base_seed + worker_id), so workers differ and a seeded run repeats.
A `torch.Generator` may be passed instead; note that it is copied into every worker with the same
state, so reseed it per worker (worker_init_fn) if workers must differ.
"""

from __future__ import annotations

import functools
import io
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL warns above Image.MAX_IMAGE_PIXELS (89.5M) and refuses above twice that; we refuse with our own
# error at PIL's hard limit by default (a 13k x 13k photo still loads).
DEFAULT_MAX_PIXELS = 2 * 89_478_485
# Resizing the short side to S makes the long side S x aspect: a 1 x 1,000,000 PNG (1 KB) would cost
# gigabytes. Longer than 50:1 is refused by default (panoramas are ~4-10:1, banners rarely past 20:1).
DEFAULT_MAX_ASPECT = 50.0

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
TRAIN_MODES = ("square_crop", "random_resized_crop")

# Modes converted to RGB *before* resizing: PIL silently resizes "1" and "P" with nearest neighbour,
# and converting 16/32-bit or float modes to RGB after resizing would clip them (OpenAI does both).
_CONVERT_FIRST = ("1", "P", "I", "F")


class ImageLoadError(ValueError):
    """An image file that cannot be read, decoded or converted (the message names the file)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """What a model expects: square input size, normalisation, resize filter."""

    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={self.mean} std={self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; choose from {sorted(INTERPOLATIONS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        unknown = set(d) - {"image_size", "mean", "std", "interpolation"}
        if unknown:
            raise ValueError(f"unknown PreprocessConfig keys: {sorted(unknown)}")
        return cls(**d)


def _as_config(cfg_or_size: PreprocessConfig | int) -> PreprocessConfig:
    if isinstance(cfg_or_size, PreprocessConfig):
        return cfg_or_size
    if isinstance(cfg_or_size, int):
        return PreprocessConfig(cfg_or_size)
    raise TypeError(f"expected PreprocessConfig or int image size, got {type(cfg_or_size).__name__}")


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
        raise ImageLoadError(f"{name}: {e} (PIL's Image.MAX_IMAGE_PIXELS limit)") from e
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
# geometry (torchvision's rules, which OpenAI's and OpenCLIP's preprocessing use)


def resize_shortest_side(
    img: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC
) -> Image.Image:
    """torchvision Resize(size) on a PIL image: short side -> size, long side -> int(size * long / short)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision CenterCrop(size) for an image at least `size` on both sides."""
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"center_crop: image {w}x{h} is smaller than the crop {size}")
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def _prepare(img: Image.Image) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(img).__name__}")
    return to_rgb(img) if img.mode in _CONVERT_FIRST or img.mode.startswith("I;16") else img


def normalise_uint8(
    images: torch.Tensor,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float32 normalised with mean/std (OpenAI's by default), on the images' device:
    the fast training path hands uint8 batches to the step, which normalises them here (on the GPU)."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean_t) / std_t


def _to_normalized_tensor(img: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    # Same float32 ops as torchvision's ToTensor + Normalize, so results match bit for bit.
    x = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3)
    x = x.permute(2, 0, 1).contiguous().float().div_(255)  # (3, H, W) in [0, 1]
    return x.sub_(mean).div_(std)


class _Base:
    def __init__(self, cfg: PreprocessConfig) -> None:
        self.config = cfg
        self.image_size = cfg.image_size
        self._resample = INTERPOLATIONS[cfg.interpolation]
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)

    def _finish(self, img: Image.Image) -> torch.Tensor:
        return _to_normalized_tensor(to_rgb(img), self._mean, self._std)


class EvalTransform(_Base):
    """PIL image -> FloatTensor (3, S, S): resize short side, center crop, RGB, normalise."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = resize_shortest_side(_prepare(img), self.image_size, self._resample)
        return self._finish(center_crop(img, self.image_size))

    def __repr__(self) -> str:
        return f"EvalTransform({self.config})"


class TrainTransform(_Base):
    """PIL image -> FloatTensor (3, S, S) with a random crop (see the module docstring for the RNG)."""

    def __init__(
        self,
        cfg: PreprocessConfig,
        mode: str = "square_crop",
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(cfg)
        if mode not in TRAIN_MODES:
            raise ValueError(f"unknown train transform mode {mode!r}; choose from {TRAIN_MODES}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        self.mode, self.scale, self.ratio = mode, tuple(scale), tuple(ratio)
        self.generator = generator

    def _randint(self, high: int) -> int:
        """Uniform in [0, high) with torchvision's call (torch.randint(0, high, (1,)))."""
        return int(torch.randint(0, high, size=(1,), generator=self.generator).item())

    def _uniform(self, lo: float, hi: float) -> float:
        return float(torch.empty(1).uniform_(lo, hi, generator=self.generator).item())

    def crop_params(self, width: int, height: int) -> tuple[int, int, int, int]:
        """torchvision RandomResizedCrop.get_params: (top, left, h, w) of the crop in the source image.

        With OpenCLIP's scale=(0.9, 1.0) no crop fits an image more elongated than ~1.48:1, so such
        images always get the fallback: the central crop with its ratio clamped to `ratio` (as in
        torchvision, hence in OpenCLIP).
        """
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))  # float32, as torchvision computes it
        for _ in range(10):
            target_area = area * self._uniform(self.scale[0], self.scale[1])
            aspect = torch.exp(torch.empty(1).uniform_(*log_ratio.tolist(), generator=self.generator)).item()
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return self._randint(height - h + 1), self._randint(width - w + 1), h, w
        in_ratio = width / height  # no valid crop in 10 tries: central crop clamped to the ratio range
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img, n = _prepare(img), self.image_size
        if self.mode == "square_crop":
            img = resize_shortest_side(img, n, self._resample)
            w, h = img.size
            top, left = self._randint(h - n + 1), self._randint(w - n + 1)  # torchvision RandomCrop order
            img = img.crop((left, top, left + n, top + n))
        else:
            top, left, h, w = self.crop_params(*img.size)
            img = img.crop((left, top, left + w, top + h)).resize((n, n), self._resample)
        return self._finish(img)

    def __repr__(self) -> str:
        return f"TrainTransform({self.config}, mode={self.mode!r}, scale={self.scale}, ratio={self.ratio})"


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes, not yet decoded (a shard member): what `FastTrainTransform` decodes at
    reduced scale. `name` is what errors call it ("shard.tar:key.jpg")."""

    data: bytes
    name: str


# JPEG decoders scale by 1/2, 1/4 or 1/8 inside the inverse DCT (libjpeg's scale_denom; PIL `draft`). 1/8
# is the DC coefficient alone (8x8 block means): 2-3x the pixel error of 1/4 at 64 px, so it is not used.
_DCT_SCALES = (4, 2, 1)

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


def eval_transform(cfg_or_size: PreprocessConfig | int) -> EvalTransform:
    """OpenAI's eval preprocessing for a model input size (or a PreprocessConfig)."""
    return EvalTransform(_as_config(cfg_or_size))


def train_transform(
    cfg_or_size: PreprocessConfig | int,
    mode: str = "square_crop",
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> TrainTransform:
    """Training preprocessing: "square_crop" (CLIP paper) or "random_resized_crop" (OpenCLIP default)."""
    return TrainTransform(_as_config(cfg_or_size), mode, scale, ratio, generator)


def fast_train_transform(
    cfg_or_size: PreprocessConfig | int,
    mode: str = "square_crop",
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> FastTrainTransform:
    """`train_transform`'s crops, JPEGs decoded at reduced scale, uint8 output (see FastTrainTransform)."""
    return FastTrainTransform(_as_config(cfg_or_size), mode, scale, ratio, generator)
