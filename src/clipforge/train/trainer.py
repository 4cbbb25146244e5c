"""A trainer that knows little about CLIP: a loop over batches calling `step_fn`, evaluators passed in.

    trainer = Trainer(model, step_fn, optimizer, scheduler, BatchStream(dataset, 64, seed=0), steps=1000,
                      run_dir=RunDir("runs/x"), evaluators={"val": lambda m: {...}},
                      after_step=CLIP.clamp_logit_scale, scalars=lambda m: {"logit_scale": ...})
    trainer.fit(resume=True)

`step_fn(model, batch, step=..., backward=...) -> loss` runs forward and backward (calling
`backward(loss)` so fp16 loss scaling stays here) and returns the detached loss; the trainer owns
precision (autocast), clipping, the optimizer/scheduler step, non-finite guards, checkpoints (every N steps,
at the end and on SIGTERM/SIGINT), metrics and the progress bar.
"""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.streams import BatchStream, IterableBatchStream
from ..models.hardware import slow_bf16_reason
from .dist import any_rank, gather_json, is_main
from .fsdp import full_training_state, is_fsdp, load_full_training_state
from .metrics import MetricsLogger, plot_metrics, read_metrics
from .optim import clip_gradients
from .restore import OptimizerSettings, checkpoint_to_resume, data_position
from .runs import RunDir, rng_state, set_rng_state

StepFn = Callable[..., torch.Tensor]
Evaluator = Callable[[torch.nn.Module], Mapping[str, float]]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run is diverging."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was written before stopping."""


# ------------------------------------------------------------------------------------------ trainer
@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # the loss of every step this process ran
    nonfinite_steps: int = 0
    eval: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        step_fn: StepFn,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        data: BatchStream | IterableBatchStream,
        *,
        steps: int,
        batch_size: int,
        run_dir: RunDir | None = None,
        config: Mapping[str, Any] | None = None,
        precision: str = "fp32",
        grad_clip: float | None = None,
        evaluators: Mapping[str, Evaluator] | None = None,
        eval_every: int = 0,
        checkpoint_every: int = 0,
        keep_last: int = 3,
        log_every: int = 10,
        max_nonfinite: int = 5,
        after_step: Callable[[torch.nn.Module], None] | None = None,
        scalars: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
        progress: bool = True,
        tensorboard: bool = False,
        handle_signals: bool = True,
        check_resume: Callable[[Mapping[str, Any], Mapping[str, Any]], None] | None = None,
        identity: Mapping[str, str] | None = None,
    ) -> None:
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.model, self.step_fn, self.optimizer, self.scheduler, self.data = (
            model,
            step_fn,
            optimizer,
            scheduler,
            data,
        )
        self.steps, self.batch_size, self.run_dir = steps, batch_size, run_dir
        self.config = dict(config or {})
        # what the run was started from beyond its config (e.g. a locked tower's weights hash): saved with
        # every checkpoint and compared on resume as config["identity"]
        self.identity = dict(identity or {})
        self.precision, self.grad_clip = precision, grad_clip
        self.evaluators = dict(evaluators or {})
        self.eval_every, self.checkpoint_every, self.keep_last = eval_every, checkpoint_every, keep_last
        self.log_every, self.max_nonfinite = max(1, log_every), max_nonfinite
        self.after_step, self.scalars = after_step, scalars
        self.progress, self.tensorboard, self.handle_signals = progress, tensorboard, handle_signals
        self.device = next(model.parameters()).device
        # DDP: step_fn gets the wrapper; state, evaluation and callbacks the model inside. Rank 0 alone
        # writes the run directory; every rank reads checkpoints.
        self.module = getattr(model, "module", model)
        self.is_main = is_main()
        # FSDP2: state dicts gather the shards and the forward all-gathers them, so every rank takes part
        # in checkpoints and evaluation (rank 0 alone writes)
        self.fsdp = is_fsdp(model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 training needs a GPU (loss scaling); use bf16 on CPU")
        slow = slow_bf16_reason(self.device) if precision == "bf16" else None
        if slow:
            warnings.warn(f"{slow}; train in fp32", stacklevel=2)
        self.step = 0
        self.nonfinite_total = 0
        self._nonfinite_run = 0
        self._stop_signal: int | None = None
        # check_resume(saved config, this config) raises when a checkpoint may not continue under this config
        self.check_resume = check_resume
        # this run's optimizer hyperparameters and schedule: a resume keeps them (OptimizerSettings.reapply)
        self._settings = OptimizerSettings(optimizer, scheduler)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The consolidated training state (FSDP2: every rank must call it; rank 0 gets the weights)."""
        if self.fsdp:
            model_state, optim_state = full_training_state(self.model, self.optimizer)
        else:
            model_state, optim_state = self.module.state_dict(), self.optimizer.state_dict()
        return {
            "step": self.step,
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "data": self.data.state_dict(),
            "nonfinite_total": self.nonfinite_total,
            "config": self.config,
            "identity": self.identity,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.fsdp:
            load_full_training_state(self.model, self.optimizer, state["model"], state["optimizer"])
        else:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._settings.reapply(self.optimizer, self.scheduler)
        self.data.load_state_dict(data_position(state))
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        set_rng_state(state["rng"])

    def save_checkpoint(self) -> None:
        """Every rank calls it at the same step (collectives); rank 0 writes."""
        if self.run_dir is None:
            return
        positions = gather_json(self.data.state_dict())  # a collective: every rank's data position
        if not (self.is_main or self.fsdp):
            return
        state = self.state_dict()  # FSDP2: a collective on every rank
        if len(positions) > 1:
            state["data_ranks"] = positions
        if self.is_main:
            self.run_dir.save_checkpoint(state, self.step, self.keep_last)

    def resume(self) -> bool:
        """Load the newest checkpoint of the run directory; False when there is none."""
        if self.run_dir is None:
            return False
        current = {**self.config, "identity": self.identity}
        state = checkpoint_to_resume(
            self.run_dir, steps=self.steps, config=current, check=self.check_resume, verbose=self.is_main
        )
        if state is None:
            return False
        self.load_state_dict(state)
        return True

    # ---------------------------------------------------------------- loop
    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    @contextmanager
    def _signals(self):
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def train_step(self, batch: Any) -> tuple[float, bool]:
        """One optimizer step; returns (loss, applied). A non-finite loss or gradient skips the update."""
        self.model.train()
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.step_fn(self.model, batch, step=self.step, backward=self._backward)
        value = float(loss)
        finite = math.isfinite(value)
        if finite and self.grad_clip is not None:
            norm = clip_gradients(self.model, self.grad_clip, self.optimizer, self.scaler)  # unscales fp16
            # fp16: the scaler skips inf gradients itself (and lowers the scale); elsewhere we skip.
            finite = self.precision == "fp16" or bool(torch.isfinite(norm))
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.after_step is not None:
                self.after_step(self.module)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
                self.scheduler.step()
        return value, finite

    def evaluate(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name, ev in self.evaluators.items():
            run = getattr(ev, "run", ev)
            try:
                values = run(self.module)
            except (OSError, ValueError, RuntimeError) as e:  # bad evaluation data never costs the run
                if self.is_main:
                    tqdm.write(f"evaluation {name!r} failed at step {self.step} and was left out: {e}")
                continue
            for k, v in values.items():
                metrics[f"{name}/{k}"] = float(v)
        self.model.train()
        return metrics

    def fit(self, resume: bool = False) -> TrainResult:
        logger = None
        if self.run_dir is not None and self.is_main:
            self.run_dir.create()
            for p in self.run_dir.remove_temp_files():
                print(f"note: removed {p}, left by an interrupted write")
        if resume and not self.resume() and self.is_main:  # every rank loads the checkpoint
            print(
                f"no checkpoint in {self.run_dir.checkpoints if self.run_dir else '(no run dir)'}; "
                "starting fresh"
            )
        if self.run_dir is not None and self.is_main and self.config:
            self.run_dir.save_config(self.config)  # after the resume checks: what actually runs
        if self.run_dir is not None and self.is_main:
            MetricsLogger.truncate_after(self.run_dir.metrics, self.step)
            tb = self.run_dir.path / "tensorboard" if self.tensorboard else None
            logger = MetricsLogger(self.run_dir.metrics, tb)
        result = TrainResult(step=self.step)
        t_start = time.perf_counter()
        bar = tqdm(
            total=self.steps,
            initial=self.step,
            desc="train",
            disable=not (self.progress and self.is_main),
            dynamic_ncols=True,
        )
        window_t, window_n = time.perf_counter(), 0
        stream = None
        try:
            with self._signals():
                stream = iter(self.data)
                while self.step < self.steps:
                    batch = next(stream)
                    loss, applied = self.train_step(batch)
                    self.step += 1
                    result.losses.append(loss)
                    window_n += self.batch_size
                    if applied:
                        self._nonfinite_run = 0
                    else:
                        self.nonfinite_total += 1
                        self._nonfinite_run += 1
                        if self._nonfinite_run >= self.max_nonfinite:
                            raise NonFiniteLossError(
                                f"{self._nonfinite_run} consecutive non-finite losses/gradients up to step "
                                f"{self.step} (last loss {loss}); the run is diverging: lower optim.lr, use "
                                f"fp32/bf16, or enable optim.grad_clip. Last good checkpoint: "
                                f"{self.run_dir.latest_checkpoint() if self.run_dir else None}"
                            )
                    record = self._log_record(loss, window_n, time.perf_counter() - window_t)
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{loss:.4f}",
                        lr=f"{record['lr']:.2e}",
                        scale=f"{record.get('logit_scale', 0):.1f}",
                        sps=f"{record['samples_per_s']:.0f}",
                    )
                    if logger is not None and (self.step % self.log_every == 0 or self.step == self.steps):
                        logger.log(record)
                        window_t, window_n = time.perf_counter(), 0
                    last = self.step == self.steps
                    if (
                        self.evaluators
                        and (self.is_main or self.fsdp)
                        and (last or (self.eval_every and self.step % self.eval_every == 0))
                    ):
                        result.eval = self.evaluate()
                        if logger is not None:
                            logger.log({"kind": "eval", "step": self.step, **result.eval})
                        if self.is_main:
                            bar.write(
                                f"step {self.step}: "
                                + ", ".join(f"{k} {v:.3f}" for k, v in result.eval.items())
                            )
                    if last or (self.checkpoint_every and self.step % self.checkpoint_every == 0):
                        self.save_checkpoint()
                    # a signal may reach the ranks at different steps: all stop at the same one
                    if any_rank(self._stop_signal is not None) and not last:
                        self.save_checkpoint()
                        name = signal.Signals(self._stop_signal or signal.SIGTERM).name
                        raise TrainingInterrupted(
                            f"{name} at step {self.step}: checkpoint saved; continue with --resume"
                        )
        finally:
            if stream is not None and hasattr(stream, "close"):
                stream.close()  # stops its DataLoader workers now, not at garbage collection
            bar.close()
            if logger is not None:
                logger.close()
        result.step, result.nonfinite_steps = self.step, self.nonfinite_total
        result.seconds = time.perf_counter() - t_start
        if self.run_dir is not None and self.is_main:
            plot_metrics(read_metrics(self.run_dir.metrics), self.run_dir.plots)
        return result

    def _log_record(self, loss: float, samples: int, seconds: float) -> dict[str, Any]:
        record: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "loss": loss,
            "lr": self.last_lr,
            "samples_per_s": samples / max(seconds, 1e-9),
            "nonfinite_steps": self.nonfinite_total,
        }
        if self.scalars is not None:
            record.update({k: float(v) for k, v in self.scalars(self.module).items()})
        skips = self.data.skip_counts()
        if skips:
            record["skipped"] = skips
        return record
