"""Contrastive objectives as pure functions of (already normalised) features.

- `clip_loss`: symmetric InfoNCE over the scaled cosine-similarity matrix (Radford et al. 2021, Fig. 3),
  with ConVIRT's lambda weighting of the two directions (Zhang et al. 2020; CLIP: lambda = 0.5).
- `siglip_loss`: SigLIP's pairwise sigmoid loss (Zhai et al. 2023, Algorithm 1).
- `clip_loss_local_vs_global`: the multi-device form of `clip_loss` (OpenCLIP's `local_loss=True`).

`OBJECTIVES` declares each objective once (`Objective`: its single-device and gathered multi-device form
and the facts callers need); `get_loss(name)` gives it the one signature the training step calls:
`loss_fn(image_features, text_features, logit_scale, logit_bias) -> scalar`.

Nothing here gathers across devices: the caller passes gathered features (gathering with gradients is
a separate function, clipforge.train.global_loss).

The predictive objectives of the paper's Figure 2 (a captioning language model, bag-of-words prediction)
are declared in `PREDICTIVE_OBJECTIVES`, not in `OBJECTIVES`: their loss is a function of a head's
vocabulary logits and the caption's token ids, not of two feature matrices and a temperature, and it is a
mean of per-sample terms, so it needs no gathered form (the mean of equal local batches is the global
mean, which DDP's gradient averaging already gives). Forcing them into `Objective`'s (img, txt, scale,
bias) signature would hide that; see clipforge.models.predictive for the models that produce the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _check(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.dim() != 2 or text_features.dim() != 2:
        raise ValueError(
            "features must be (N, D) and (M, D), "
            f"got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image and text features differ in width: {image_features.shape[1]} vs {text_features.shape[1]}"
        )


def _default_labels(n: int, m: int, device: torch.device) -> torch.Tensor:
    if m < n:
        raise ValueError(f"{n} images but only {m} texts: pass labels (the positive text of each image)")
    return torch.arange(n, device=device)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    lam: float = 0.5,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE: lam * CE(image -> text) + (1 - lam) * CE(text -> image).

    image_features (N, D) and text_features (M, D) are L2-normalised; logit_scale is the temperature
    already exponentiated (CLIPOutput.logit_scale). logits = logit_scale * img @ txt.T is (N, M).
    labels (N,) gives the column of each image's positive text (default: the diagonal, needs M >= N).
    Image -> text is a softmax over all M texts (extra texts act as negatives); text -> image is a
    softmax over the N images for each text that is some image's positive. Each text must be the
    positive of at most one image.
    """
    _check(image_features, text_features)
    if not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise ValueError(
            f"lam must be a float in [0, 1], got {lam!r} (as a training-step loss_fn(img, txt, scale, bias), "
            "use get_loss('clip'))"
        )
    n, m = image_features.shape[0], text_features.shape[0]
    square = labels is None and m == n
    if labels is None:
        labels = _default_labels(n, m, image_features.device)
    elif labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    logits = logit_scale * image_features @ text_features.T  # (N, M)
    loss_i2t = F.cross_entropy(logits, labels)
    # text -> image: row k = the positive text of image k against all N images
    logits_t = logits.T if square else logits[:, labels].T  # (N, N)
    loss_t2i = F.cross_entropy(logits_t, torch.arange(n, device=logits.device))
    return lam * loss_i2t + (1.0 - lam) * loss_t2i


def clip_loss_local_vs_global(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    all_image_features: torch.Tensor,
    all_text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    offset: int,
    lam: float = 0.5,
) -> torch.Tensor:
    """`clip_loss` for one device of many: local rows against gathered columns.

    image_features/text_features (n, D) are this device's pairs; all_* (M, D) are the features of every
    device concatenated in rank order (gathered *with* gradients by the caller), in which this device's
    pairs sit at rows offset .. offset + n - 1. The loss is
        lam * CE(local images -> all texts) + (1 - lam) * CE(local texts -> all images),
    so the mean of this value over devices equals `clip_loss` of the whole global batch, and summing the
    per-device gradients (what DDP does, up to its 1/world averaging) gives the global-batch gradient.
    Cost is n x M logits per device instead of M x M.
    """
    _check(image_features, all_text_features)
    _check(text_features, all_image_features)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    n, m = image_features.shape[0], all_text_features.shape[0]
    if text_features.shape[0] != n or all_image_features.shape[0] != m:
        raise ValueError(
            "local image/text features and gathered image/text features must pair up row for row"
        )
    if not 0 <= offset <= m - n:
        raise ValueError(f"offset {offset} puts {n} local rows outside the {m} gathered rows")
    labels = torch.arange(offset, offset + n, device=image_features.device)
    loss_i2t = F.cross_entropy(logit_scale * image_features @ all_text_features.T, labels)  # (n, M)
    loss_t2i = F.cross_entropy(logit_scale * text_features @ all_image_features.T, labels)  # (n, M)
    return lam * loss_i2t + (1.0 - lam) * loss_t2i


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    labels: torch.Tensor | None = None,
    negative_only: bool = False,
) -> torch.Tensor:
    """SigLIP: -(1/N) * sum_ij log sigmoid(z_ij * (t * x_i . y_j + b)), z = +1 for a pair, -1 otherwise.

    image_features (N, D), text_features (M, D) normalised; logit_scale t already exponentiated; logit_bias
    b. labels (N,) as in `clip_loss` (default: the diagonal). negative_only=True treats every pair as a
    negative: SigLIP's chunked multi-device loss uses it for the text blocks of the other devices, and
    the sum of a device's blocks divided by its N rows is exactly SigLIP's normalisation.
    """
    _check(image_features, text_features)
    n, m = image_features.shape[0], text_features.shape[0]
    logits = logit_scale * image_features @ text_features.T + logit_bias  # (N, M)
    z = -torch.ones_like(logits)
    if not negative_only:
        if labels is None:
            labels = _default_labels(n, m, logits.device)
        elif labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        z[torch.arange(n, device=logits.device), labels] = 1.0
    return -F.logsigmoid(z * logits).sum() / n


# ------------------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class Objective:
    """One contrastive objective, declared once: its two forms and the facts its callers need.

    local(img (N, D), txt (N, D), scale, bias, lam) -> scalar: the whole batch on one device.
    gathered(img (n, D), txt (n, D), all_img (M, D) | None, all_txt (M, D) | None, scale, bias, offset, lam)
        -> scalar: one device of many. img/txt are its n pairs, all_* the M pairs of every device in rank
        order (this device's at rows offset .. offset + n - 1), gathered with gradients by the caller; only
        the features named in `gathers` are passed, the others are None. The batch-weighted mean over
        devices, sum_r (n_r / M) gathered_r, must equal local() of the M pairs, values and gradients
        (tests/test_loss.py checks every entry in one process by slicing a batch).

    The forms take already-gathered tensors instead of gathering themselves: this module stays pure PyTorch
    below train/ (no process group), and every form is testable in one process.
    """

    local: Callable[..., torch.Tensor]
    gathered: Callable[..., torch.Tensor]
    gathers: tuple[str, ...]  # features every rank all-gathers for `gathered`: "image" and/or "text"
    needs_bias: bool  # both forms raise without a logit_bias (a model with config init_logit_bias)
    # Peak bytes of local() + backward (fp32) per element of the B x B logits, for memory planning
    # (train.step.max_effective_batch). Measured as the peak RSS growth of loss + backward on CPU at
    # B = 4096 and 8192, D = 512.
    bytes_per_logit: int


def _need_bias(name: str, bias: torch.Tensor | float | None) -> torch.Tensor | float:
    if bias is None:
        raise ValueError(f"{name} loss needs a model with a logit_bias (config init_logit_bias, e.g. -10)")
    return bias


def _clip_local(img, txt, scale, bias=None, lam: float = 0.5) -> torch.Tensor:
    return clip_loss(img, txt, scale, lam=lam)  # the bias cancels in the softmax: ignored


def _clip_gathered(img, txt, all_img, all_txt, scale, bias, offset: int, lam: float = 0.5) -> torch.Tensor:
    return clip_loss_local_vs_global(img, txt, all_img, all_txt, scale, offset, lam=lam)


def _siglip_local(img, txt, scale, bias=None, lam: float = 0.5) -> torch.Tensor:
    return siglip_loss(img, txt, scale, _need_bias("siglip", bias))  # lam: softmax only, ignored


def _siglip_gathered(img, txt, all_img, all_txt, scale, bias, offset: int, lam: float = 0.5) -> torch.Tensor:
    # local images x all texts covers each pair of the global batch once; normalised by the local rows, so
    # the batch-weighted mean over devices is SigLIP's 1/M normalisation (Zhai et al. 2023, chunked form)
    labels = torch.arange(offset, offset + img.shape[0], device=img.device)
    return siglip_loss(img, all_txt, scale, _need_bias("siglip", bias), labels=labels)


OBJECTIVES: dict[str, Objective] = {
    # ~4 B x B buffers: similarities, two log-softmaxes, a gradient (measured 16.3-16.5 bytes)
    "clip": Objective(_clip_local, _clip_gathered, ("image", "text"), needs_bias=False, bytes_per_logit=16),
    # ~5 B x B buffers (measured 20.3-20.5 bytes)
    "siglip": Objective(_siglip_local, _siglip_gathered, ("text",), needs_bias=True, bytes_per_logit=20),
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def get_loss(name: str, lam: float = 0.5) -> LossFn:
    """The objective `name` (a key of OBJECTIVES: "clip", "siglip") as loss_fn(image_features,
    text_features, logit_scale, logit_bias). "clip" ignores the bias (a constant shift cancels in the
    softmax); "siglip" needs one."""
    local = get_objective(name).local

    def loss_fn(img, txt, logit_scale, logit_bias=None):
        return local(img, txt, logit_scale, logit_bias, lam=lam)

    return loss_fn


# ------------------------------------------------------------------------------------------ predictive
def next_token_targets(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) ids -> (targets (N, T-1), mask (N, T-1)): position j predicts tokens[:, j + 1]; positions
    after each row's EOT (its largest id) are padding and masked out, the EOT itself is predicted."""
    eot = tokens.argmax(dim=-1)  # (N,)
    pos = torch.arange(1, tokens.shape[1], device=tokens.device)  # index of the target token
    return tokens[:, 1:], pos[None, :] <= eot[:, None]


def caption_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Language-model loss of a captioner: mean next-token cross entropy over the caption's tokens.

    logits (N, T-1, V): the prediction for tokens[:, j + 1] at position j (after SOT and the image);
    tokens (N, T) with SOT first and EOT last (zero padding after it). Every predicted token (each word
    and the EOT) of the batch weighs the same."""
    targets, mask = next_token_targets(tokens)
    if logits.shape[:2] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match next-token targets {tuple(targets.shape)}"
        )
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (N, T-1)
    return (ce * mask).sum() / mask.sum().clamp(min=1)


def bow_targets(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, T) ids -> (N, V) the caption's normalised token counts (Joulin et al. 2016's bag-of-words target),
    SOT, EOT and padding excluded. A caption without words gets an all-zero row (and no loss)."""
    targets, mask = next_token_targets(tokens)
    mask = mask & (targets != targets.max(dim=-1, keepdim=True).values)  # drop each row's EOT
    counts = torch.zeros(tokens.shape[0], vocab_size, device=tokens.device)
    counts.scatter_add_(1, targets, mask.float())
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)


def bow_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Bag-of-words prediction: cross entropy of a softmax over the vocabulary, logits (N, V), against the
    caption's normalised token counts (`bow_targets`), averaged over the captions."""
    target = bow_targets(tokens, logits.shape[-1])
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


@dataclass(frozen=True)
class PredictiveObjective:
    """A loss on a model's vocabulary logits and the caption ids: loss(logits, tokens) -> scalar.
    `head` names what the model's `predict` must return: "sequence" (N, T-1, V) next-token logits, or
    "bag" (N, V) one distribution per image."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    head: str


PREDICTIVE_OBJECTIVES: dict[str, PredictiveObjective] = {
    "captioning": PredictiveObjective(caption_loss, "sequence"),
    "bow": PredictiveObjective(bow_loss, "bag"),
}
