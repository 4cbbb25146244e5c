"""Training: optimizer and schedule, the contrastive step (exact accumulation), the trainer loop."""

from .optim import build_optimizer, clip_gradients, cosine_schedule, param_groups
from .step import StepResult, contrastive_step, make_step_fn, max_effective_batch, trim_tokens

__all__ = [
    "StepResult",
    "build_optimizer",
    "clip_gradients",
    "contrastive_step",
    "cosine_schedule",
    "make_step_fn",
    "max_effective_batch",
    "param_groups",
    "trim_tokens",
]
