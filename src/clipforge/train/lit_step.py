"""The LiT training step: a contrastive step that takes cached image embeddings instead of pixels.

With a locked image tower and an embedding cache, batches are {"image_embedding": (B, D), "text":
(B, T)}: the image tower is never run. Batches with "image" run the ordinary step (the locked tower
runs live, in eval mode under no_grad). Both go through `train.step.contrastive_step`, so exact
gradient accumulation, text trimming and the fp32 loss are the same as for CLIP.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..loss import LossFn, get_loss
from ..models.clip import CLIPOutput
from .step import contrastive_step


class _LiTForward(nn.Module):
    """Adapter for one step: model(images or cached embeddings, tokens) -> CLIPOutput.

    Image features of a locked tower (or of the cache) carry no autograd graph; contrastive_step's
    accumulation skips them when it back-propagates the cached feature gradients.
    """

    def __init__(self, model: nn.Module, cached: bool) -> None:
        super().__init__()
        self.model, self.cached = model, cached

    def no_sync(self):
        """DDP: contrastive_step keeps the gradients of all but the last accumulation pass local."""
        return self.model.no_sync() if hasattr(self.model, "no_sync") else nullcontext()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, mask_ratio: float = 0.0) -> CLIPOutput:
        m = self.model
        if isinstance(m, nn.parallel.DistributedDataParallel):
            # DDP arms its gradient all-reduce inside its own forward, so this forward must run there:
            # for the call, the adapter stands in for the wrapped CLIP (the same parameters).
            inner = m.module
            m.module = _LiTForward(inner, self.cached)
            try:
                return m(images, tokens, mask_ratio=mask_ratio)
            finally:
                m.module = inner
        img = images.float() if self.cached else m.encode_image(images, mask_ratio=mask_ratio)
        return CLIPOutput(
            image_features=F.normalize(img, dim=-1),
            text_features=F.normalize(m.encode_text(tokens), dim=-1),
            logit_scale=m.logit_scale.exp().clamp(max=m.config.max_logit_scale),
            logit_bias=m.logit_bias,
        )


def make_lit_step_fn(
    loss: LossFn | str = "clip", *, lam: float = 0.5, accum_steps: int = 1, mask_ratio: float = 0.0
) -> Callable[..., torch.Tensor]:
    """The trainer's `step_fn(model, batch, step=..., backward=...) -> loss` for LiT batches."""
    loss_fn = get_loss(loss, lam=lam) if isinstance(loss, str) else loss

    def step_fn(
        model: nn.Module,
        batch: Mapping[str, Any] | Sequence[torch.Tensor],
        step: int = 0,
        backward: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        cached = isinstance(batch, Mapping) and "image_embedding" in batch
        if cached:
            images = batch["image_embedding"]
        else:
            images = batch["image"] if isinstance(batch, Mapping) else batch[0]
        texts = batch["text"] if isinstance(batch, Mapping) else batch[1]
        result = contrastive_step(
            _LiTForward(model, cached),
            images,
            texts,
            loss_fn,
            accum_steps=accum_steps,
            mask_ratio=mask_ratio,
            backward=backward,
        )
        return torch.tensor(result.loss)

    return step_fn
