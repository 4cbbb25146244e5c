"""The exact transforms (PIL + torch, no torchvision): PIL image -> normalised FloatTensor (3, S, S).

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

import math

import numpy as np
import torch
from PIL import Image

from .config import INTERPOLATIONS, OPENAI_MEAN, OPENAI_STD, PreprocessConfig, _as_config
from .images import to_rgb

TRAIN_MODES = ("square_crop", "random_resized_crop")

# Modes converted to RGB *before* resizing: PIL silently resizes "1" and "P" with nearest neighbour,
# and converting 16/32-bit or float modes to RGB after resizing would clip them (OpenAI does both).
_CONVERT_FIRST = ("1", "P", "I", "F")


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
