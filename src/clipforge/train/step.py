"""The training step for a contrastive batch: forward + backward, with exact gradient accumulation.

A contrastive loss couples every pair in the batch, so summing micro-batch losses is *not* the
big-batch loss. `contrastive_step(..., accum_steps=K)` is exact instead (OpenCLIP's accum_freq, the
"gradient cache" of Gao et al. 2021):

1. micro-batch 0 runs forward with grad; micro-batches 1..K-1 run under no_grad and only their
   normalised features are kept (B x D floats each for images and texts);
2. the loss over the whole batch is computed from those features and back-propagated once: this gives
   the gradients of micro-batch 0's parameters, of the logit scale/bias, and d loss / d features of
   the cached micro-batches;
3. micro-batches 1..K-1 run forward again with grad and back-propagate their cached feature gradients
   (torch.autograd.backward(features, grads)), adding into .grad.

Peak activation memory is one micro-batch; compute is K forwards with grad, K - 1 without, and the
backward passes, i.e. about 4/3 of a plain step. The sum of the micro-batch gradients equals the
full-batch gradient up to float rounding (tests/test_accumulation.py).

Randomness: patch masking (FLIP) draws a random mask per forward; the recomputation in 3. restores each
micro-batch's RNG state (CPU and CUDA) from 1., so it sees the same masks, and the RNG afterwards is as if
each micro-batch had run once. BatchNorm (ResNet towers in train mode) normalises by micro-batch
statistics, as DDP without SyncBatchNorm does per device, so for BN towers the result is exactly "the
big batch made of K BN-micro-batches"; running statistics are restored after 3., so each micro-batch
updates them exactly once.

The step never calls optimizer.step(): the trainer does that (then model.clamp_logit_scale()).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..loss import LossFn, get_loss, get_objective
from ..transforms import OPENAI_MEAN, OPENAI_STD, normalise_uint8
from .dist import get_rank

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class StepResult:
    loss: float  # the loss of the whole (accumulated) batch
    logit_scale: float  # the temperature t (exp'd, clamped) the loss used
    logit_bias: float | None  # SigLIP's bias, None for models without one
    batch_size: int
    text_length: int  # token positions after trimming to the longest caption


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(N, T) -> (N, T') with T' = longest EOT position + 1 (EOT = each row's largest id). Exact: the
    causal text tower pools at the EOT, so later positions never influence the features."""
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        return tokens
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Running statistics that a forward in train mode would change."""
    return [
        b
        for m in model.modules()
        if isinstance(m, _BN) and m.training and m.track_running_stats
        for b in (m.running_mean, m.running_var, m.num_batches_tracked)
        if b is not None
    ]


def _no_sync(model: nn.Module, local: bool):
    """DDP: keep this pass's gradients local (model.no_sync around the forward); the last pass of an
    accumulated step then all-reduces the accumulated sum once."""
    return model.no_sync() if local and hasattr(model, "no_sync") else nullcontext()


def contrastive_step(
    model: nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor,
    loss_fn: LossFn | str = "clip",
    accum_steps: int = 1,
    mask_ratio: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    pixel_norm: tuple[Sequence[float], Sequence[float]] = (OPENAI_MEAN, OPENAI_STD),
) -> StepResult:
    """Forward and backward of one contrastive batch; gradients are added to the parameters' .grad.

    images: float (B, 3, S, S) ready for the model, or uint8 (the fast training path's batches), which
    are normalised here on the model's device with `pixel_norm` = (mean, std): 4x fewer bytes cross to
    the device and the division runs there.

    model(images, texts, mask_ratio=...) must return a CLIPOutput (normalised features, exp'd logit_scale,
    logit_bias or None). loss_fn(image_features, text_features, logit_scale, logit_bias) -> scalar, or a
    name for `clipforge.loss.get_loss`. The loss runs in fp32 with autocast off (the B x B logits are
    cheap and precision-sensitive). accum_steps splits the batch into that many micro-batches, exactly
    (see the module docstring). autocast_dtype (bfloat16 on CPU/GPU, float16 on GPU) wraps the tower
    forwards; the trainer may instead wrap the whole call in torch.autocast. The loss is back-propagated
    with `backward(loss)` when given (the trainer's, which scales for fp16), else scaler.scale(loss)
    .backward() when a scaler is given, else loss.backward(); the cached feature gradients then carry the
    same scale.
    """
    if isinstance(loss_fn, str):
        loss_fn = get_loss(loss_fn)
    n = images.shape[0]
    if texts.shape[0] != n:
        raise ValueError(f"{n} images but {texts.shape[0]} texts: a contrastive batch needs pairs")
    if not 1 <= accum_steps <= n:
        raise ValueError(f"accum_steps must be between 1 and the batch size {n}, got {accum_steps}")
    device = next(model.parameters()).device
    texts = trim_tokens(texts)
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalise_uint8(images, *pixel_norm)
    texts = texts.to(device, non_blocking=True)
    img_chunks, txt_chunks = images.tensor_split(accum_steps), texts.tensor_split(accum_steps)
    sizes = [len(c) for c in img_chunks]

    def amp():
        return nullcontext() if autocast_dtype is None else torch.autocast(device.type, dtype=autocast_dtype)

    # 1. micro-batch 0 with grad, the others without (features only), remembering each one's RNG state.
    rng = [_rng_state(device)]
    with amp(), _no_sync(model, accum_steps > 1):
        out = model(img_chunks[0], txt_chunks[0], mask_ratio=mask_ratio)
    img_feats, txt_feats = [out.image_features.float()], [out.text_features.float()]
    cached_img = cached_txt = None
    if accum_steps > 1:
        with torch.no_grad():
            for k in range(1, accum_steps):
                rng.append(_rng_state(device))
                with amp():
                    o = model(img_chunks[k], txt_chunks[k], mask_ratio=mask_ratio)
                img_feats.append(o.image_features.float())
                txt_feats.append(o.text_features.float())
        cached_img = torch.cat(img_feats[1:]).requires_grad_()  # leaves: their .grad = d loss / d features
        cached_txt = torch.cat(txt_feats[1:]).requires_grad_()
        img_feats, txt_feats = [img_feats[0], cached_img], [txt_feats[0], cached_txt]
    rng_after, bn_after = _rng_state(device), [b.clone() for b in _bn_buffers(model)]

    # 2. the loss over the whole batch, in fp32, back-propagated once.
    scale = out.logit_scale.float()
    bias = None if out.logit_bias is None else out.logit_bias.float()
    with torch.autocast(device.type, enabled=False):
        loss = loss_fn(torch.cat(img_feats), torch.cat(txt_feats), scale, bias)
    if backward is not None:
        backward(loss)
    elif scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()

    # 3. re-run micro-batches 1..K-1 with grad (same RNG, hence same masks) and push their feature grads.
    if accum_steps > 1:
        img_grads = cached_img.grad.split(sizes[1:])
        txt_grads = cached_txt.grad.split(sizes[1:])
        for k in range(1, accum_steps):
            _set_rng_state(rng[k], device)
            with amp(), _no_sync(model, k < accum_steps - 1):
                o = model(img_chunks[k], txt_chunks[k], mask_ratio=mask_ratio)
            outs = [o.image_features.float(), o.text_features.float()]
            grads = [img_grads[k - 1], txt_grads[k - 1]]
            # Zero gradients into the temperature/bias (theirs came with the loss in 2.): every backward then
            # reaches every parameter, as DDP's reducer requires for the final, synchronising pass.
            for extra in (o.logit_scale, o.logit_bias):
                if extra is not None and extra.requires_grad:
                    outs.append(extra)
                    grads.append(torch.zeros_like(extra))
            # A locked tower (LiT) or cached embeddings give features without a graph: nothing to push.
            pairs = [(f, g) for f, g in zip(outs, grads) if f.requires_grad]
            if pairs:
                torch.autograd.backward([f for f, _ in pairs], [g for _, g in pairs])
        _set_rng_state(rng_after, device)
        with torch.no_grad():
            for b, saved in zip(_bn_buffers(model), bn_after):
                b.copy_(saved)

    return StepResult(
        loss=float(loss.detach()),
        logit_scale=float(scale.detach()),
        logit_bias=None if bias is None else float(bias.detach()),
        batch_size=n,
        text_length=texts.shape[1],
    )


def make_step_fn(
    loss: LossFn | str = "clip",
    *,
    lam: float = 0.5,
    accum_steps: int = 1,
    mask_ratio: float = 0.0,
    unmasked_from_step: int | None = None,
    pixel_norm: tuple[Sequence[float], Sequence[float]] = (OPENAI_MEAN, OPENAI_STD),
    seed: int | None = None,
) -> Callable[..., torch.Tensor]:
    """The trainer's `step_fn(model, batch, step=..., backward=...) -> loss` for contrastive pairs.

    batch is a mapping {"image": (B, 3, S, S), "text": (B, T)} or a pair (images, texts). From step
    `unmasked_from_step` on, masking is switched off (FLIP's short unmasked tuning at the end of a run).
    With `seed`, a masked step draws its masks from RNGs seeded by (seed, step, rank) (forked: the
    global streams are left as they were). Every rank starts from the same seed (identical model init),
    so without it all ranks drew the same masks for their rows; and the masks do not depend on where a
    run was resumed.
    Precision is the trainer's: it wraps the call in torch.autocast and passes its scaling `backward`.
    uint8 images are normalised on the device with `pixel_norm` (the model's preprocessing mean, std).
    """
    loss_fn = get_loss(loss, lam=lam) if isinstance(loss, str) else loss

    def step_fn(
        model: nn.Module,
        batch: Mapping[str, Any] | Sequence[torch.Tensor],
        step: int = 0,
        backward: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        images, texts = (batch["image"], batch["text"]) if isinstance(batch, Mapping) else batch
        masked = mask_ratio > 0 and (unmasked_from_step is None or step < unmasked_from_step)
        with _mask_rng(seed, step, images.device) if masked and seed is not None else nullcontext():
            result = contrastive_step(
                model,
                images,
                texts,
                loss_fn,
                accum_steps=accum_steps,
                mask_ratio=mask_ratio if masked else 0.0,
                backward=backward,
                pixel_norm=pixel_norm,
            )
        return torch.tensor(result.loss)

    return step_fn


@contextmanager
def _mask_rng(seed: int, step: int, device: torch.device):
    """The CPU and this device's RNGs seeded by (seed, step, rank) for one step, then restored."""
    value = ((seed * 1_000_003 + step) * 65_537 + get_rank()) & 0x7FFF_FFFF_FFFF
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.default_generator.manual_seed(value)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(value)
        yield


def accumulation_memory_bytes(batch_size: int, embed_dim: int, loss: str = "clip") -> int:
    """Memory the accumulated step needs beyond one micro-batch: the cached image and text features and
    their gradients (4 * B * D fp32 numbers) plus the B x B logits and their softmax/gradient buffers
    (the objective's measured bytes per logit, clipforge.loss.OBJECTIVES)."""
    per_logit = get_objective(loss).bytes_per_logit
    return 16 * batch_size * embed_dim + per_logit * batch_size * batch_size


def max_effective_batch(memory_bytes: int, embed_dim: int, loss: str = "clip") -> int:
    """The largest contrastive batch B whose accumulation overhead fits in memory_bytes (the memory left
    after the model, optimizer state and one micro-batch's activations). The B x B loss dominates past a
    few thousand; beyond that, a chunked loss (blocks of rows, as SigLIP's per-device chunks) is the next
    step."""
    a, b = get_objective(loss).bytes_per_logit, 16 * embed_dim  # a B^2 + b B <= memory
    batch = int((-b + math.sqrt(b * b + 4 * a * max(0, memory_bytes))) / (2 * a))
    while batch > 0 and accumulation_memory_bytes(batch, embed_dim, loss) > memory_bytes:
        batch -= 1
    return batch
