"""An image tower + linear head, for supervised pretraining of a tower that LiT then locks.

The tower is the same VisionTransformer / ModifiedResNet CLIP uses, with its `proj` mapping to
`embed_dim`; the head maps that feature to class logits. A LiT model takes `classifier.visual` as its
image tower and the feature (before the head) as the image embedding.

Saving and loading: `clipforge.checkpoints.classifier`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionConfig
from .towers import build_image_tower


class ImageClassifier(nn.Module):
    def __init__(self, vision: VisionConfig, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.vision_config, self.embed_dim, self.num_classes = vision, embed_dim, num_classes
        self.visual = build_image_tower(vision, embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.visual.init_weights()
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, embed_dim), the feature a LiT model uses."""
        return self.visual(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, num_classes) logits."""
        return self.head(self.forward_features(pixels))

    def no_weight_decay(self) -> set[str]:
        names = set()
        for mod_name, mod in self.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                if p.ndim < 2 or p_name in ("pos_embed", "class_embedding"):
                    names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
        return names
