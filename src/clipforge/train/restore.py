"""Continuing a run from its checkpoints: which one, this rank's data position, and this run's settings.

    settings = OptimizerSettings(optimizer, scheduler)     # at start, before any checkpoint is loaded
    state = checkpoint_to_resume(run_dir, steps=1000, config=..., check=check_resume_config)
    ... load the model, optimizer, scheduler from state ...
    settings.reapply(optimizer, scheduler)                 # this run's rates, weight decay, schedule
    data.load_state_dict(data_position(state))

The Trainer uses these in `resume` / `load_state_dict`; which config changes a resume may make is decided
by the `check` it is given (resume.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..checkpoints.state import StateFormatError
from .dist import get_rank, get_world_size
from .runs import RunDir, load_checkpoint


class OptimizerSettings:
    """This run's optimizer hyperparameters and schedule, taken before a checkpoint replaces them."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None
    ) -> None:
        self.groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self.schedule = (
            # copies: LambdaLR.load_state_dict updates the saved lambda objects' attributes in place
            (list(scheduler.base_lrs), copy.deepcopy(scheduler.lr_lambdas))
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
            else None
        )

    def reapply(
        self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None
    ) -> None:
        """After loading a checkpoint: this run's learning rates, weight decay, betas and schedule (e.g. more
        train.steps, a new optim.lr) replace the saved ones, and the rate is recomputed for the restored
        step. The moment estimates and the step count stay the checkpoint's. Unchanged settings give
        exactly the saved values (the same arithmetic as the scheduler's), so a plain resume is bit-exact."""
        for group, fresh in zip(optimizer.param_groups, self.groups):
            group.update(fresh)
        if self.schedule is None:
            return
        sched = scheduler
        sched.base_lrs, sched.lr_lambdas = list(self.schedule[0]), copy.deepcopy(self.schedule[1])
        for group, base, fn in zip(optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in optimizer.param_groups]


def data_position(state: Mapping[str, Any]) -> Any:
    """This rank's data position in a checkpoint: its own when the world size is the checkpoint's (shards
    split over ranks drift apart), else rank 0's (the same global batches at any world size)."""
    ranks = state.get("data_ranks")
    return ranks[get_rank()] if ranks and len(ranks) == get_world_size() else state["data"]


def checkpoint_to_resume(
    run_dir: RunDir,
    *,
    steps: int,
    config: Mapping[str, Any],
    check: Callable[[Mapping[str, Any], Mapping[str, Any]], None] | None = None,
    verbose: bool = True,
) -> dict[str, Any] | None:
    """The state of the newest readable checkpoint of `run_dir` (None when there is none), once `check(saved
    config, config)` and the step count allow this run (of `steps` steps) to continue from it.

    `config` holds this run's config with its identity under "identity"; a checkpoint cut short by a crash
    or a full disk is passed over for the one before it (noted when `verbose`)."""
    latest = run_dir.latest_checkpoint()
    if latest is None:
        return None
    older = [p for _, p in reversed(run_dir.list_checkpoints()) if p != latest]
    errors: list[str] = []
    candidates = [latest, *older]
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except StateFormatError as e:  # cut short by a crash or a full disk: the one before will do
            errors.append(str(e))
            if verbose and path != candidates[-1]:
                print(f"note: {e}; resuming from the checkpoint before it")
            continue
        if check is not None:
            check({**(state.get("config") or {}), "identity": state.get("identity") or {}}, config)
        if int(state["step"]) > steps:  # it would stop at once, recording steps it did not run
            raise ValueError(
                f"{path} is at step {int(state['step'])}, past this run's {steps} steps: resume "
                f"with train.steps >= {int(state['step'])}, or start a new run.output_dir"
            )
        return state
    raise StateFormatError(f"{errors[0]}; and no older readable checkpoint to resume from")
