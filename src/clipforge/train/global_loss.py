"""The global contrastive loss: features all-gathered with gradients, each rank's rows against all columns.

CLIP (Radford et al. 2021): "the similarity matrix is computed over all GPUs"; LiT (Zhai et al. 2022,
Table 5): a global loss beats a per-device one. Every rank r holds n_r pairs of a global batch of
M = sum n_r. It all-gathers the features *with gradients* (torch.distributed.nn.functional.all_gather,
whose backward sums the gradients of every rank into the owner's rows) and computes its n_r local rows
against all M columns, labels offset by the rows of the ranks before it: n_r x M logits per rank, never
M x M. With L_r the mean over rank r's rows, the global-batch loss is L = sum_r (n_r / M) L_r. DDP averages
gradients over W ranks, so each rank back-propagates w_r L_r with w_r = W n_r / M (1 when the ranks hold
equal batches): the averaged gradient is then exactly the single-process gradient of L. The returned
value is L itself on every rank (an all-reduced number with w_r L_r's gradient), so logs and non-finite
checks agree across ranks.

SigLIP (Zhai et al. 2023) covers every (image, text) pair of the global batch once: local images against
all texts, so only text features are gathered; normalised by the global batch, as the 1-process loss.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from ..loss import clip_loss, clip_loss_local_vs_global, siglip_loss
from .dist import is_distributed

MODES = ("global", "local")


# ------------------------------------------------------------------------------------------ gathering
def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Rows held by every rank (one tiny all_gather)."""
    if not is_distributed():
        return [n]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(s) for s in sizes]


def gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """(n_r, D) on each rank -> (sum n_r, D) in rank order, differentiable: the backward sums every rank's
    gradient of its copy into the owner's rows (torch.distributed.nn.functional.all_gather). Ranks may hold
    different row counts (`sizes`, from gather_sizes): rows are padded to the largest for the collective."""
    if not is_distributed():
        return x
    sizes = sizes if sizes is not None else gather_sizes(x.shape[0], x.device)
    top = max(sizes)
    padded = x if x.shape[0] == top else torch.cat([x, x.new_zeros(top - x.shape[0], *x.shape[1:])])
    # torch 2.13 deprecates this for a private replacement; it is the public, autograd-aware all_gather
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_fn.all_gather(padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


# ------------------------------------------------------------------------------------------ the loss
def _rebase(loss: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * loss as the gradient, the mean over ranks of weight * loss as the value."""
    scaled = loss * weight
    if not is_distributed():
        return scaled
    total = scaled.detach().clone()
    dist.all_reduce(total)
    return scaled + (total / dist.get_world_size() - scaled).detach()


class DistributedLoss:
    """`loss_fn(image_features, text_features, logit_scale, logit_bias)` of a rank's local batch.

    name "clip" (softmax, ConVIRT weight `lam`) or "siglip"; mode "global" (every rank against the
    gathered global batch) or "local" (each rank's batch alone, LiT's comparison). In both modes the DDP-
    averaged gradient is the gradient of the returned value, which is the same on every rank: the global
    batch's loss ("global"), or the batch-weighted mean of the per-rank losses ("local"). A single
    process gives exactly clipforge.loss.get_loss(name). Pass it to contrastive_step / make_step_fn.
    """

    def __init__(self, name: str = "clip", mode: str = "global", lam: float = 0.5) -> None:
        if name not in ("clip", "siglip"):
            raise ValueError(f"unknown loss {name!r}; choose 'clip' or 'siglip'")
        if mode not in MODES:
            raise ValueError(f"unknown loss mode {mode!r}; choose one of {MODES}")
        self.name, self.mode, self.lam = name, mode, lam

    def __repr__(self) -> str:
        return f"DistributedLoss({self.name!r}, mode={self.mode!r}, lam={self.lam})"

    def _local(self, img, txt, scale, bias, labels=None) -> torch.Tensor:
        if self.name == "clip":
            return clip_loss(img, txt, scale, lam=self.lam, labels=labels)
        if bias is None:
            raise ValueError("siglip loss needs a model with a logit_bias (config init_logit_bias, e.g. -10)")
        return siglip_loss(img, txt, scale, bias, labels=labels)

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not is_distributed():
            return self._local(image_features, text_features, logit_scale, logit_bias)
        n, rank, world = image_features.shape[0], dist.get_rank(), dist.get_world_size()
        sizes = gather_sizes(n, image_features.device)
        total = sum(sizes)
        weight = world * n / total  # DDP divides by world; rank r's share of the global mean is n / total
        if self.mode == "local":
            return _rebase(self._local(image_features, text_features, logit_scale, logit_bias), weight)
        offset = sum(sizes[:rank])
        all_txt = gather_with_grad(text_features, sizes)  # (M, D)
        if self.name == "siglip":  # local images x all texts covers each pair of the global batch once
            labels = torch.arange(offset, offset + n, device=image_features.device)
            loss = self._local(image_features, all_txt, logit_scale, logit_bias, labels=labels)
        else:
            all_img = gather_with_grad(image_features, sizes)  # (M, D)
            loss = clip_loss_local_vs_global(
                image_features, text_features, all_img, all_txt, logit_scale, offset, lam=self.lam
            )
        return _rebase(loss, weight)


def gather_bytes_per_step(
    global_batch: int, embed_dim: int, world: int, name: str = "clip"
) -> dict[str, int]:
    """All-gather traffic of one step of the global loss, fp32: bytes each rank receives (forward; the
    backward's reduce-scatter moves the same amount again) and the per-rank logits it materialises."""
    local = global_batch // world
    tensors = 2 if name == "clip" else 1
    received = tensors * (global_batch - local) * embed_dim * 4
    logits = (2 if name == "clip" else 1) * local * global_batch
    return {"received_bytes": received, "backward_bytes": received, "logits_per_rank": logits}
