"""The tower contract and the image-tower registry.

Every tower, image or text, ours or a pretrained HF encoder, exposes the same three methods, so code
that works on "a tower" (LiT locking, FSDP wrapping, gradient checkpointing) never guesses attribute
names:

    tower.blocks()                     # [block, ...] residual blocks in forward order
    tower.head()                       # [param, ...] what comes after the last block (final norm or
                                       #   pooling, the projection into the joint space)
    tower.set_grad_checkpointing(on)   # recompute each block's activations in the backward pass

A new image tower is one module with these methods (plus `init_weights()` and
`forward(pixels, mask_ratio=0.0) -> (N, embed_dim)`), one entry in `IMAGE_TOWERS`, and its `kind` in
`config.VisionConfig`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from ..config import VisionConfig
from .vision import ModifiedResNet, VisionTransformer


@runtime_checkable
class Tower(Protocol):
    def blocks(self) -> list[nn.Module]: ...

    def head(self) -> list[nn.Parameter]: ...

    def set_grad_checkpointing(self, enable: bool = True) -> None: ...


# VisionConfig.kind -> image tower class; each is built as cls(vision_config, embed_dim).
IMAGE_TOWERS: dict[str, type[nn.Module]] = {"vit": VisionTransformer, "resnet": ModifiedResNet}


def build_image_tower(cfg: VisionConfig, embed_dim: int) -> nn.Module:
    """The image tower `cfg.kind` names, mapping to `embed_dim` features; not yet initialised (the caller
    runs `init_weights()`, or loads weights)."""
    if cfg.kind not in IMAGE_TOWERS:
        raise ValueError(f"unknown image tower kind {cfg.kind!r}; expected one of {sorted(IMAGE_TOWERS)}")
    return IMAGE_TOWERS[cfg.kind](cfg, embed_dim)
