"""From an `Experiment` to a running `Trainer`: a straight sequence of short steps.

    result = run_experiment(load_experiment("run.yaml", ["train.steps=100"]), resume=True)
    model, preprocess, tokenizer = clipforge.load("runs/x/model")

build_trainer: process group -> starting checkpoint / LiT towers -> preprocessing -> data Source ->
tokenizer -> model -> batch stream -> evaluators -> placement (device, FSDP) -> optimizer and schedule ->
DDP -> step function -> Trainer. This is the only place that knows both the experiment config and CLIP;
the trainer itself does not, and data code gets only the fields it needs.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.skip_report import SkipReport
from ..data.sources import EmbeddingCacheSource, Source, StreamOptions, open_source
from ..eval.evaluators import evaluator_for, validation_evaluators
from ..transforms import PreprocessConfig, eval_transform, fast_train_transform, train_transform
from .dist import DistInfo, barrier, cleanup, init_distributed, is_main, sum_over_ranks
from .experiment import Experiment
from .fsdp import is_fsdp, meta_copy, model_state_dict, shard_fsdp, wrap_ddp
from .global_loss import DistributedLoss
from .model_setup import (
    build_tokenizer_and_model,
    input_preprocess,
    lit_image_source,
    resolve_device,
    tower_identity,
)
from .optim import build_optimizer, cosine_schedule
from .resume import check_resume_config
from .runlock import RunLock
from .runs import RunDir, seed_everything
from .step import make_step_fn
from .trainer import Trainer, TrainResult

__all__ = ["Built", "build_trainer", "check_fresh_start", "export_model", "run_experiment"]


@dataclass
class Built:
    trainer: Trainer
    tokenizer: Any
    preprocess: Any  # PreprocessConfig of the model's inputs (exported with it)
    data: Any  # the batch stream (SkipReport for file sources)
    export_template: Any = None  # FSDP2: rank 0's meta-device copy of the model (see exported_module)

    def exported_module(self) -> torch.nn.Module | None:
        """The trained model as a plain module on rank 0 (None elsewhere). FSDP2: gathers the shards, so
        every rank must call it."""
        module = self.trainer.module
        if not is_fsdp(module):
            return module if is_main() else None
        state = model_state_dict(module)  # collective: rank 0 receives the consolidated weights
        if not is_main():
            return None
        self.export_template.load_state_dict(state, assign=True)
        return self.export_template


def open_data(exp: Experiment, image_size: int) -> Source:
    """The experiment's data Source (wrapped by its embedding cache when `data.embedding_cache` is set)."""
    fields = {**dataclasses.asdict(exp.data), "seed": exp.run.seed, "image_size": image_size}
    if exp.data.embedding_cache:  # the cache holds embeddings and captions; data.train only checks it
        return EmbeddingCacheSource.open(exp.data.embedding_cache, exp.data.kind, fields)
    return open_source(exp.data.kind, fields)


def data_stream(
    exp: Experiment, source: Source, dataset: Any, dist_info: DistInfo, metrics: Path | None, progress: bool
):
    """Resumable batches of this rank; sources that can skip samples report their counts every epoch."""
    d = exp.data
    opts = StreamOptions(
        batch_size=exp.train.batch_size,
        seed=exp.run.seed,
        shuffle=d.shuffle,
        workers=d.workers,
        pin_memory=dist_info.device.type == "cuda",
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    stream = source.stream(dataset, opts)
    if source.skips is None:
        return stream
    echo = (tqdm.write if progress else print) if dist_info.is_main else (lambda msg: None)
    reduce = sum_over_ranks if dist_info.distributed else None  # rank 0 reports what every rank skipped
    return SkipReport(stream, source.skips, metrics if dist_info.is_main else None, echo=echo, reduce=reduce)


def build_evaluators(
    exp: Experiment, source: Source, preprocess: PreprocessConfig, tokenizer
) -> dict[str, Callable]:
    """The source's own evaluation sets, then `data.val` (retrieval) and `data.val_labelled` (zero-shot)."""
    d = exp.data
    evs = {name: evaluator_for(s) for name, s in source.eval_sets().items()}
    evs.update(
        validation_evaluators(
            eval_transform(preprocess),
            val=d.val,
            val_labelled=d.val_labelled,
            classnames=d.classnames,
            templates=d.templates,
            image_key=d.image_key,
            caption_key=d.caption_key,
            label_key=d.label_key,
            caption_sep=d.caption_sep,
            root=d.root,
        )
    )
    return {k: (lambda m, ev=ev: ev.run(m, tokenizer)) for k, ev in evs.items()}


def place_model(model: torch.nn.Module, exp: Experiment, dist_info: DistInfo):
    """(model on its device, checkpointed and FSDP2-sharded as configured; rank 0's meta-device export
    template under FSDP2, else None). Shard before the optimizer sees the parameters."""
    t = exp.train
    model = model.to(dist_info.device)
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if t.compile:
        from ..models.compile import compile_towers

        reason = compile_towers(model)
        if reason is not None and dist_info.is_main:
            print(f"train.compile: {reason}; training runs eagerly")
    if t.strategy == "fsdp" and dist_info.distributed:
        # FSDP2 replaces the parameters by sharded ones. A meta-device copy (no memory) receives the
        # gathered weights on rank 0 to export the trained model.
        template = meta_copy(model) if dist_info.is_main else None
        return shard_fsdp(model, unit=t.fsdp_unit), template
    return model, None


def build_optim(model: torch.nn.Module, exp: Experiment):
    o = exp.optim
    optimizer = build_optimizer(model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
    if o.schedule == "cosine":
        scheduler = cosine_schedule(
            optimizer, o.warmup_steps, exp.train.steps, o.min_lr / o.lr if o.lr else 0.0
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / max(1, o.warmup_steps))
        )
    return optimizer, scheduler


def build_step(exp: Experiment, cached: bool, pixel_norm=None):
    """The step function: the objective (global over ranks), exact accumulation, FLIP masking; batches of
    {"image_embedding", "text"} when training from an embedding cache (the image tower never runs)."""
    t = exp.train
    loss = DistributedLoss(t.loss, t.loss_mode, t.lam)  # one process: exactly get_loss(t.loss)
    if cached:
        from .lit_step import make_lit_step_fn

        return make_lit_step_fn(loss, lam=t.lam, accum_steps=t.accum_steps)
    return make_step_fn(
        loss,
        lam=t.lam,
        accum_steps=t.accum_steps,
        mask_ratio=t.mask_ratio,
        unmasked_from_step=t.steps - t.unmasked_steps if t.unmasked_steps else None,
        seed=exp.run.seed,  # FLIP masks from (seed, step, rank): they differ across ranks
        **({"pixel_norm": pixel_norm} if pixel_norm is not None else {}),  # for uint8 batches (fast_decode)
    )


def _scalars(m) -> dict[str, float]:
    out = {"logit_scale": m.logit_scale.exp().item()}
    if m.logit_bias is not None:
        out["logit_bias"] = m.logit_bias.item()
    return out


def build_trainer(exp: Experiment, progress: bool = True, resume: bool = False) -> Built:
    """Everything `trainer.fit(resume=...)` needs, from the experiment config."""
    seed_everything(exp.run.seed)
    # torchrun: join the process group (NCCL/gloo); a single process otherwise. train.batch_size is global.
    dist_info = init_distributed(resolve_device(exp.train.device))
    if exp.train.batch_size % dist_info.world_size:
        raise ValueError(
            f"train.batch_size={exp.train.batch_size} (the global batch) does not split over "
            f"{dist_info.world_size} processes"
        )
    ckpt_model = ckpt_preprocess = ckpt_tok = None
    if exp.model.checkpoint:
        from ..checkpoints import load

        ckpt_model, ckpt_preprocess, ckpt_tok = load(exp.model.checkpoint)
    image_source = lit_image_source(exp)
    preprocess = input_preprocess(exp, ckpt_preprocess, image_source)
    source = open_data(exp, preprocess.image_size)
    tokenizer, model = build_tokenizer_and_model(
        exp, source, (ckpt_model, ckpt_tok), image_source, resume, progress
    )
    model = model.train()
    identity = tower_identity(exp, model)  # before placement (FSDP2 shards the weights)
    if isinstance(source, EmbeddingCacheSource):
        source.check(model.visual, exp.model.image_tower)
    if exp.data.augment == "none":
        transform = eval_transform(preprocess)
    elif exp.data.fast_decode:  # uint8 crops, normalised on the device by the step (pixel_norm)
        transform = fast_train_transform(preprocess, mode=exp.data.augment)
    else:
        transform = train_transform(preprocess, mode=exp.data.augment)
    dataset = source.dataset(transform, tokenizer, model.config.text.context_length)
    run_dir = RunDir(exp.run.output_dir)
    data = data_stream(exp, source, dataset, dist_info, run_dir.metrics, progress)
    # DDP: rank 0 alone evaluates, so only it reads the evaluation sets (FSDP2: every rank takes part)
    evaluates = dist_info.is_main or (exp.train.strategy == "fsdp" and dist_info.distributed)
    evaluators = build_evaluators(exp, source, preprocess, tokenizer) if evaluates else {}
    model, export_template = place_model(model, exp, dist_info)
    optimizer, scheduler = build_optim(model, exp)
    if exp.train.strategy == "ddp":
        model = wrap_ddp(model)  # several processes: DDP (after the optimizer saw the plain parameter names)
    r, t = exp.run, exp.train
    trainer = Trainer(
        model,
        build_step(
            exp, cached=isinstance(source, EmbeddingCacheSource), pixel_norm=(preprocess.mean, preprocess.std)
        ),
        optimizer,
        scheduler,
        data,
        steps=t.steps,
        batch_size=t.batch_size,
        run_dir=run_dir,
        config=exp.to_dict(),
        precision=t.precision,
        grad_clip=exp.optim.grad_clip,
        evaluators=evaluators,
        eval_every=r.eval_every,
        checkpoint_every=r.checkpoint_every,
        keep_last=r.keep_last,
        log_every=r.log_every,
        max_nonfinite=t.max_nonfinite,
        after_step=lambda m: m.clamp_logit_scale(),
        scalars=_scalars,
        progress=progress,
        tensorboard=r.tensorboard,
        identity=identity,
        check_resume=lambda saved, current: check_resume_config(
            saved, current, echo=print if dist_info.is_main else (lambda msg: None)
        ),
    )
    return Built(trainer, tokenizer, preprocess, data, export_template)


def export_model(model: torch.nn.Module, tokenizer, out_dir: str | Path, preprocess=None) -> Path:
    """save_pretrained into out_dir/model: `clipforge.load(out_dir / "model")` gives the model back (LiT
    models with a HF text tower included: its config and tokenizer go to model/text_tower/)."""
    from ..checkpoints import save_pretrained

    path = Path(out_dir) / "model"
    preprocess = preprocess or PreprocessConfig(model.config.vision.image_size)
    save_pretrained(model, path, tokenizer=tokenizer, preprocess=preprocess)
    return path


def check_fresh_start(output_dir: str | Path, resume: bool) -> None:
    """A run directory that already holds checkpoints is only continued with --resume. A fresh run there
    would leave the old run's newer checkpoints in place (keep_last deleting its own first, as the oldest),
    so a later --resume would silently pick up the old run's state."""
    newest = RunDir(output_dir).latest_checkpoint()
    if not resume and newest is not None:
        raise ValueError(
            f"run.output_dir {output_dir} already holds a run (newest checkpoint {newest.name}): add "
            "--resume to continue it, or set another run.output_dir (or remove that one) to start afresh"
        )


def run_experiment(exp: Experiment, resume: bool = False, progress: bool = True) -> TrainResult:
    """Build and fit; one run per output directory (rank 0 holds the lock for the run's life); a directory
    with checkpoints is continued only with `resume`."""
    out = Path(exp.run.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"run.output_dir {out} exists and is not a directory")
    lock = RunLock(out).acquire() if is_main() else None
    try:
        check_fresh_start(out, resume)  # under the lock: no other run is writing checkpoints there
        built = build_trainer(exp, progress=progress, resume=resume)
        result = built.trainer.fit(resume=resume)
        if hasattr(built.data, "finish"):
            built.data.finish()  # the skip counts of the epoch the run ended in
        module = built.exported_module()  # FSDP2: gathered on every rank
        if module is not None:
            export_model(module, built.tokenizer, exp.run.output_dir, built.preprocess)
        barrier()  # every rank leaves together: none tears the process group down under another
        # DDP's reducer holds the process group: free the model while the group is alive, so the group is
        # torn down inside cleanup(). Freed later (when this frame ends, after destroy_process_group), its
        # destructor deadlocked in gloo once in a while (rank 1 stuck in pthread_mutex_lock in libtorch_cpu
        # on returning from here, gloo's threads alive: a py-spy dump of CI's hung torchrun test).
        del built, module
        gc.collect()
    finally:
        cleanup()  # leave the process group (torchrun runs); nothing in a single process
        if lock is not None:
            lock.release()
    return result
