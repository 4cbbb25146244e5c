"""AdamW with decoupled weight decay, the cosine schedule with linear warm-up, and gradient clipping.

Defaults follow CLIP's ViT settings (Radford et al. 2021, Table 19/20; OpenCLIP): betas (0.9, 0.98),
eps 1e-6, weight decay 0.2 on matrices only — never on gains, biases, embeddings or the temperature.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def _no_decay_rule(name: str, p: nn.Parameter) -> bool:
    """Fallback for models without `no_weight_decay()`: gains/biases (ndim < 2), embeddings, temperature."""
    return p.ndim < 2 or "embed" in name or "logit_" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{"params": decayed, "weight_decay": wd}, {"params": not decayed, "weight_decay": 0.0}].

    The no-decay set is `model.no_weight_decay()` (parameter names) when the model has one, else the rule
    above. Frozen parameters (requires_grad=False, e.g. a locked LiT tower) are left out; empty groups
    are dropped. Every trainable parameter appears exactly once (shared parameters once, too).
    """
    no_wd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else None
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        skip = name in no_wd if no_wd is not None else _no_decay_rule(name, p)
        (no_decay if skip else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.2,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)`. fused=None picks torch's fused kernel where this torch
    offers it for these parameters (CUDA; CPU since torch 2.4, where it ran 3x faster than the default
    for-loop on a 22M CLIP, updates equal within float32 rounding), else torch's default."""
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    kwargs = {"lr": lr, "betas": betas, "eps": eps}
    if fused is None:
        if not all(p.is_floating_point() for p in params):
            return torch.optim.AdamW(groups, **kwargs)
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # e.g. torch < 2.4 fuses CUDA tensors only
            return torch.optim.AdamW(groups, **kwargs)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


class WarmupCosine:
    """lr factor at `step`: linear warm-up (step+1)/warmup, then cosine from 1 to min_lr_ratio at total_steps.

    A class (not a closure) so that LambdaLR.state_dict() saves its settings with the scheduler.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> None:
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(
                f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}"
            )
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR: lr = base_lr * WarmupCosine(step); call scheduler.step() once per optimizer step.
    After total_steps the rate stays at base_lr * min_lr_ratio."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))


def clip_gradients(
    parameters: nn.Module | Iterable[torch.Tensor],
    max_norm: float,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Clip the global gradient norm to max_norm and return the norm before clipping (inf/nan when the
    gradients are not finite: the caller should then skip the step). With an enabled fp16 GradScaler,
    the gradients are unscaled first (scaler.unscale_(optimizer)), so max_norm is in true units."""
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    if scaler is not None and scaler.is_enabled():
        if optimizer is None:
            raise ValueError(
                "clip_gradients with a GradScaler needs the optimizer (to unscale its gradients)"
            )
        scaler.unscale_(optimizer)
    return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
