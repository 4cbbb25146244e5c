"""What a model expects of its input images: `PreprocessConfig` (input size, normalisation, resize filter)
and the constants it is built from (OpenAI's mean/std, the PIL filters by name).

Kept apart from the transforms so that code which only records or checks a model's preprocessing
(checkpoints, model setup, encoders) reads it without the image code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


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
