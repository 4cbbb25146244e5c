"""In-memory pair datasets: pre-rendered uint8 tensors (fast) and the synthetic set rendered on access."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ..transforms import OPENAI_MEAN, OPENAI_STD
from .pairs import encode_text
from .synthetic import ShapesConfig, Split, _check_shift, make_captions, render_scene, split_combos


class TensorPairs(Dataset):
    """Pairs held as uint8 images (N, 3, H, W) and tokens (N, ctx) (or a list of caption strings).

    Items are {"image": FloatTensor (3, S, S) normalised with mean/std, "text": tokens[i]}. With
    `crop=S < H`, training takes the paper's random square crop (torch's global RNG, which the trainer
    seeds per sample) and eval (`train=False`) the centre crop.
    """

    def __init__(
        self,
        images: torch.Tensor,
        texts: torch.Tensor | Sequence[str],
        *,
        crop: int | None = None,
        train: bool = True,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(texts) != len(images):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if len(images) == 0:
            raise ValueError("TensorPairs got no pairs")
        h, w = images.shape[-2:]
        if crop is not None and not 0 < crop <= min(h, w):
            raise ValueError(f"crop {crop} does not fit images of {h}x{w}")
        self.images, self.texts, self.crop, self.train = images, texts, crop, train
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = self.images[index]
        if self.crop is not None:
            h, w = img.shape[-2:]
            c = self.crop
            if self.train:
                top = int(torch.randint(h - c + 1, ()))
                left = int(torch.randint(w - c + 1, ()))
            else:  # torchvision CenterCrop rounding
                top, left = round((h - c) / 2.0), round((w - c) / 2.0)
            img = img[:, top : top + c, left : left + c]
        image = (img.float() / 255.0 - self.mean) / self.std
        return {"image": image, "text": self.texts[index]}


class SyntheticPairs(Dataset):
    """The synthetic shapes set rendered on access (no memory for images): item i is scene i of `split`.

    Items are {"image": transform(PIL image), "text": tokenizer([caption])[0]}; raw without them.
    """

    def __init__(
        self,
        cfg: ShapesConfig,
        n: int,
        split: Split = "train",
        *,
        shift: str = "none",
        transform: Callable | None = None,
        tokenizer: Callable | None = None,
        context_length: int | None = None,
    ) -> None:
        _check_shift(shift)
        split_combos(cfg, split)  # validates the split
        if n < 1:
            raise ValueError(f"SyntheticPairs needs n >= 1, got {n}")
        self.cfg, self.n, self.split, self.shift = cfg, n, split, shift
        self.transform, self.tokenizer, self.context_length = transform, tokenizer, context_length

    def __len__(self) -> int:
        return self.n

    def captions(self) -> list[str]:
        """Every caption, without rendering images (e.g. to train a BPE vocabulary)."""
        return make_captions(self.cfg, self.n, self.split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} synthetic pairs")
        scene = render_scene(self.cfg, self.split, index, self.shift)
        image = self.transform(scene.image) if self.transform is not None else scene.image
        return {"image": image, "text": encode_text(self.tokenizer, scene.caption, self.context_length)}
