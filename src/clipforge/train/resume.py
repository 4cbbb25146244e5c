"""What a resumed run may change: settings applied on resume, and changes that would make it another run.

    check_resume_config(checkpoint["config"], exp.to_dict())   # raises ResumeConfigError, or prints notes

Applied (the trainer re-applies this run's optimizer and schedule after loading a checkpoint): more or
fewer train.steps (the cosine schedule is recomputed for the new length and continues from the restored
step; fewer than the restored step is refused by the trainer), optim.* (learning rate, schedule, warm-up,
weight decay, betas, eps, clipping). Harmless: logging, checkpointing, evaluation sets, workers, device,
precision, parallel strategy. Everything else (the model and its towers, the training data, the batch,
the objective, the seed) defines the run: a resume that changes it is refused with the list of
differences.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

APPLIED = ("train.steps", "optim.")
HARMLESS = (
    "run.output_dir", "run.log_every", "run.eval_every", "run.checkpoint_every", "run.keep_last",
    "run.tensorboard", "data.workers", "data.val", "data.val_labelled", "data.classnames", "data.templates",
    "train.device", "train.precision", "train.grad_checkpointing", "train.compile", "train.accum_steps",
    "train.strategy", "train.fsdp_unit", "train.max_nonfinite",
)  # fmt: skip


class ResumeConfigError(ValueError):
    """The checkpoint was trained under settings this run would change."""


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (checkpoint value, this run's value)} for every setting both know that differs (a field
    added or removed by another clipforge version is not a change of the run)."""
    a, b = _flat(saved), _flat(current)
    return {k: (a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]}


def _describe(key: str, old: Any, new: Any) -> str:
    if key.startswith("identity."):  # weights fingerprints (see build_trainer)
        what = key.removeprefix("identity.")
        return f"the weights of model.{what} are not the run's (sha256 {str(old)[:12]} -> {str(new)[:12]})"
    return f"{key}: {old!r} -> {new!r}"


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], echo=print) -> None:
    if not saved:
        return  # a checkpoint written without its config: nothing to compare
    changes = config_changes(saved, current)
    refused = {k: v for k, v in changes.items() if not k.startswith(APPLIED) and k not in HARMLESS}
    if refused:
        listed = "; ".join(_describe(k, old, new) for k, (old, new) in refused.items())
        raise ResumeConfigError(
            f"cannot resume: this run changes what the checkpoint was trained as ({listed}). Resume with the "
            "checkpoint's settings, or start a new run.output_dir (fine-tune from the old run's model with "
            "model.checkpoint=<run>/model)"
        )
    applied = {k: v for k, v in changes.items() if k.startswith(APPLIED)}
    if applied:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in applied.items())
        echo(f"resuming with changed settings, applied from the restored step on: {listed}")
