"""Typed model configs and the preset registry.

One frozen dataclass per tower, composed into `CLIPConfig`. Presets are plain data in `PRESETS`;
the nine paper architectures use the widths, depths and resolutions of Radford et al. 2021
(Table 19/20) as published in OpenAI's checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

Activation = Literal["quick_gelu", "gelu"]


@dataclass(frozen=True)
class VisionConfig:
    """Image tower. `kind="vit"` uses patch_size/width/layers/heads; `kind="resnet"` uses width (stem
    width, 64 for RN50) and `layers` as four stage depths; its attention-pool heads = width * 32 // 64."""

    kind: Literal["vit", "resnet"] = "vit"
    image_size: int = 224
    width: int = 768
    layers: int | tuple[int, ...] = 12
    heads: int = 12
    patch_size: int = 32
    mlp_ratio: float = 4.0
    act: Activation = "quick_gelu"

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.kind == "vit":
            if not isinstance(self.layers, int):
                raise ValueError(f"ViT layers must be an int, got {self.layers!r}")
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
                )
            if self.width % self.heads:
                raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")
        elif self.kind == "resnet":
            if isinstance(self.layers, int) or len(self.layers) != 4:
                raise ValueError(f"ResNet layers must be four stage depths, got {self.layers!r}")
            if self.image_size % 32:
                raise ValueError(f"ResNet image_size {self.image_size} must be a multiple of 32")
        else:
            raise ValueError(f"unknown vision kind {self.kind!r} (expected 'vit' or 'resnet')")

    @property
    def grid_size(self) -> int:
        """Tokens per side: patches for a ViT, the final feature map for a ResNet."""
        return self.image_size // (self.patch_size if self.kind == "vit" else 32)


@dataclass(frozen=True)
class TextConfig:
    """Causal text Transformer; the feature at the EOT position (the largest token id) is pooled."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    act: Activation = "quick_gelu"

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set (e.g. -10) for SigLIP-style models
    max_logit_scale: float = 100.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["vision"]["layers"], tuple):
            d["vision"]["layers"] = list(d["vision"]["layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        d = dict(d)
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CLIPConfig fields: {sorted(unknown)}")
        vision = VisionConfig(**d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        return cls(vision=vision, text=text, **d)

    def replace(self, **kw: Any) -> CLIPConfig:
        return replace(self, **kw)


def _rn(embed: int, size: int, layers: tuple[int, int, int, int], width: int, text_width: int) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(
            kind="resnet", image_size=size, width=width, layers=layers, heads=width * 32 // 64
        ),
        text=TextConfig(width=text_width, heads=text_width // 64, layers=12),
    )


def _vit(embed: int, size: int, width: int, layers: int, patch: int, text_width: int) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(
            kind="vit", image_size=size, width=width, layers=layers, heads=width // 64, patch_size=patch
        ),
        text=TextConfig(width=text_width, heads=text_width // 64, layers=12),
    )


PRESETS: dict[str, CLIPConfig] = {
    # The paper's architectures (OpenAI checkpoints).
    "RN50": _rn(1024, 224, (3, 4, 6, 3), 64, 512),
    "RN101": _rn(512, 224, (3, 4, 23, 3), 64, 512),
    "RN50x4": _rn(640, 288, (4, 6, 10, 6), 80, 640),
    "RN50x16": _rn(768, 384, (6, 8, 18, 8), 96, 768),
    "RN50x64": _rn(1024, 448, (3, 15, 36, 10), 128, 1024),
    "ViT-B-32": _vit(512, 224, 768, 12, 32, 512),
    "ViT-B-16": _vit(512, 224, 768, 12, 16, 512),
    "ViT-L-14": _vit(768, 224, 1024, 24, 14, 768),
    "ViT-L-14-336": _vit(768, 336, 1024, 24, 14, 768),
    # Small presets for tests, demos and CPU experiments.
    "tiny-vit": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(kind="vit", image_size=32, width=64, layers=2, heads=2, patch_size=8),
        text=TextConfig(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    ),
    "tiny-rn": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(kind="resnet", image_size=64, width=16, layers=(1, 1, 1, 1), heads=8),
        text=TextConfig(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    ),
    # A small ViT CLIP (~4M parameters, its own small BPE vocabulary); the demo takes its text settings.
    "demo-vit": CLIPConfig(
        embed_dim=128,
        vision=VisionConfig(kind="vit", image_size=64, width=192, layers=4, heads=3, patch_size=8),
        text=TextConfig(context_length=32, vocab_size=2048, width=192, heads=3, layers=4),
    ),
    # The 22M-parameter CLIP of the training benchmark (ViT 6x256 at 64 px / patch 8, text 6x256, 32 tokens).
    "small-vit": CLIPConfig(
        embed_dim=256,
        vision=VisionConfig(kind="vit", image_size=64, width=256, layers=6, heads=4, patch_size=8),
        text=TextConfig(context_length=32, vocab_size=49408, width=256, heads=4, layers=6),
    ),
}

PAPER_PRESETS = (
    "RN50",
    "RN101",
    "RN50x4",
    "RN50x16",
    "RN50x64",
    "ViT-B-32",
    "ViT-B-16",
    "ViT-L-14",
    "ViT-L-14-336",
)


def list_models() -> list[str]:
    """Names accepted by `create_model`."""
    return list(PRESETS)


def get_config(name_or_config: str | CLIPConfig) -> CLIPConfig:
    if isinstance(name_or_config, CLIPConfig):
        return name_or_config
    # Accept OpenAI-style spellings too: "ViT-B/32", "ViT-L/14@336px".
    key = name_or_config.replace("/", "-").replace("@336px", "-336")
    if key not in PRESETS:
        raise KeyError(f"unknown model {name_or_config!r}; known: {', '.join(PRESETS)}")
    return PRESETS[key]
