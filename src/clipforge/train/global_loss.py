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

What each objective gathers and how it scores the local rows is its registry entry
(clipforge.loss.OBJECTIVES: `gathers` and the `gathered` form); this module only gathers and weighs.
SigLIP (Zhai et al. 2023), for example, gathers only the text features: local images against all texts
cover every pair of the global batch once.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from ..loss import get_objective
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

    name: a key of clipforge.loss.OBJECTIVES ("clip": softmax, ConVIRT weight `lam`; "siglip"); mode
    "global" (every rank against the gathered global batch) or "local" (each rank's batch alone, LiT's
    comparison). In both modes the DDP-averaged gradient is the gradient of the returned value, which is
    the same on every rank: the global batch's loss ("global"), or the batch-weighted mean of the per-rank
    losses ("local"). A single process gives exactly clipforge.loss.get_loss(name). Pass it to
    contrastive_step / make_step_fn.
    """

    def __init__(self, name: str = "clip", mode: str = "global", lam: float = 0.5) -> None:
        self.objective = get_objective(name)
        if mode not in MODES:
            raise ValueError(f"unknown loss mode {mode!r}; choose one of {MODES}")
        self.name, self.mode, self.lam = name, mode, lam

    def __repr__(self) -> str:
        return f"DistributedLoss({self.name!r}, mode={self.mode!r}, lam={self.lam})"

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        obj, lam = self.objective, self.lam
        if not is_distributed():
            return obj.local(image_features, text_features, logit_scale, logit_bias, lam=lam)
        n, rank, world = image_features.shape[0], dist.get_rank(), dist.get_world_size()
        sizes = gather_sizes(n, image_features.device)
        total = sum(sizes)
        weight = world * n / total  # DDP divides by world; rank r's share of the global mean is n / total
        if self.mode == "local":
            return _rebase(obj.local(image_features, text_features, logit_scale, logit_bias, lam=lam), weight)
        offset = sum(sizes[:rank])
        # every rank runs the same collectives in the same order (texts first), whatever the objective
        all_txt = gather_with_grad(text_features, sizes) if "text" in obj.gathers else None  # (M, D)
        all_img = gather_with_grad(image_features, sizes) if "image" in obj.gathers else None  # (M, D)
        loss = obj.gathered(
            image_features, text_features, all_img, all_txt, logit_scale, logit_bias, offset, lam=lam
        )
        return _rebase(loss, weight)


def gather_bytes_per_step(
    global_batch: int, embed_dim: int, world: int, name: str = "clip"
) -> dict[str, int]:
    """All-gather traffic of one step of the global loss, fp32: bytes each rank receives (forward; the
    backward's reduce-scatter moves the same amount again) and the per-rank logits it materialises."""
    local = global_batch // world
    tensors = len(get_objective(name).gathers)
    received = tensors * (global_batch - local) * embed_dim * 4
    logits = tensors * local * global_batch  # each gathered tensor meets the local rows: one n x M matrix
    return {"received_bytes": received, "backward_bytes": received, "logits_per_rank": logits}
