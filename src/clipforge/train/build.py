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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import get_config
from ..data.sources import EmbeddingCacheSource, Source, StreamOptions, open_source
from ..data.streams import SkipReport
from ..eval.evaluators import evaluator_for, validation_evaluators
from ..models import create_model
from ..transforms import PreprocessConfig, eval_transform, fast_train_transform, train_transform
from .dist import DistInfo, barrier, cleanup, init_distributed, is_main
from .experiment import Experiment
from .fsdp import is_fsdp, meta_copy, model_state_dict, shard_fsdp, wrap_ddp
from .global_loss import DistributedLoss
from .optim import build_optimizer, cosine_schedule
from .resume import check_resume_config
from .runlock import RunLock
from .runs import RunDir, seed_everything
from .step import make_step_fn
from .trainer import Trainer, TrainResult

__all__ = ["Built", "build_trainer", "export_model", "run_experiment"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"train.device={name!r} is not a device name (auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but no CUDA GPU is visible here; use train.device=cpu or auto")
    return device


def build_tokenizer(
    exp: Experiment,
    captions: list[str] | Callable[[], list[str]] | None,
    checkpoint_tokenizer: Any = None,
    context_length: int | None = None,
    resume: bool = False,
):
    """The experiment's tokenizer (see ModelSpec.tokenizer). A trained BPE is saved in
    <output_dir>/tokenizer and, with `resume`, loaded from there instead of trained again."""
    from ..tokenizer import Tokenizer, train_bpe

    spec = exp.model
    ctx = spec.context_length or context_length or get_config(spec.preset).text.context_length
    kind = spec.tokenizer
    if kind == "auto":
        kind = "checkpoint" if spec.checkpoint else "openai"
    if kind == "checkpoint":
        if checkpoint_tokenizer is None:
            raise ValueError(
                f"model.checkpoint {spec.checkpoint} carries no tokenizer; set model.tokenizer to 'openai' "
                "or a tokenizer directory"
            )
        return checkpoint_tokenizer
    if kind == "openai":
        return Tokenizer.from_openai_vocab(context_length=ctx)
    if kind == "bpe":
        saved = Path(exp.run.output_dir) / "tokenizer"
        if resume and (saved / "vocab.json").is_file():
            return Tokenizer.load(saved)
        size = spec.vocab_size or get_config(spec.preset).text.vocab_size
        # several processes: rank 0 trains and saves, the others load its files (BPE training is not
        # guaranteed to break ties the same way in every process)
        if is_main():
            texts = captions() if callable(captions) else captions
            if not texts:
                raise ValueError("model.tokenizer=bpe: no training captions to learn the vocabulary from")
            tok = train_bpe(
                tqdm(texts, desc="training BPE", leave=False, disable=len(texts) < 50_000), size, ctx
            )
            from ..checkpoints.save import atomic_directory

            with atomic_directory(saved) as tmp:  # a resume never finds half a vocabulary
                tok.save(tmp)
        barrier()
        return tok if is_main() else Tokenizer.load(saved)
    path = Path(kind)
    if not path.exists():
        raise FileNotFoundError(
            f"model.tokenizer: no such tokenizer directory: {path} (or use 'auto', 'openai', 'bpe')"
        )
    tok = Tokenizer.load(path)
    return tok


def build_model(
    exp: Experiment, tokenizer, checkpoint_model: torch.nn.Module | None = None
) -> torch.nn.Module:
    """A fresh model of the preset sized to the tokenizer, or the checkpoint's model (fine-tuning)."""
    spec = exp.model
    if checkpoint_model is not None:
        text = checkpoint_model.config.text
        if tokenizer.vocab_size > text.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but {spec.checkpoint} embeds "
                f"{text.vocab_size}; "
                "use model.tokenizer=checkpoint (or a tokenizer of that vocabulary)"
            )
        return checkpoint_model.train()
    cfg = get_config(spec.preset)
    text = dataclasses.replace(
        cfg.text,
        vocab_size=tokenizer.vocab_size,
        context_length=spec.context_length or cfg.text.context_length,
    )
    return create_model(cfg.replace(text=text))


def lit_image_source(exp: Experiment):
    """The pretrained image tower of a LiT experiment (loaded once: its preprocessing sizes the data)."""
    if exp.model.lit is None or not exp.model.image_tower:
        return None
    from ..lit.build import load_image_tower

    return load_image_tower(exp.model.image_tower)


def build_lit(exp: Experiment, tokenizer, image_source) -> tuple[torch.nn.Module, Any]:
    """(LiT model with the policy applied, tokenizer): `model.lit` and the tower sources."""
    from ..lit.build import build_lit_model
    from ..lit.locking import LiTPolicy

    m = exp.model
    policy = LiTPolicy.parse(m.lit, m.image_unlocked_blocks, m.text_unlocked_blocks)
    model, tokenizer = build_lit_model(
        policy,
        preset=m.preset,
        image=image_source,
        text=m.text_tower,
        tokenizer=tokenizer,
        pooling=m.pooling,
        context_length=m.context_length,
    )
    return model.train(), tokenizer


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


def input_preprocess(exp: Experiment, ckpt_preprocess: Any, image_source: Any) -> PreprocessConfig:
    """The model's input preprocessing: the LiT image tower's, else the checkpoint's, else the preset's."""
    if image_source is not None:  # LiT: the data follows the pretrained image tower's preprocessing
        keep = ("image_size", "mean", "std", "interpolation")
        return PreprocessConfig.from_dict({k: v for k, v in image_source.preprocess.items() if k in keep})
    if getattr(ckpt_preprocess, "config", None) is not None:
        return ckpt_preprocess.config
    return PreprocessConfig(get_config(exp.model.preset).vision.image_size)


def open_data(exp: Experiment, image_size: int) -> Source:
    """The experiment's data Source (wrapped by its embedding cache when `data.embedding_cache` is set)."""
    fields = {**dataclasses.asdict(exp.data), "seed": exp.run.seed, "image_size": image_size}
    if exp.data.embedding_cache:  # the cache holds embeddings and captions; data.train only checks it
        return EmbeddingCacheSource.open(exp.data.embedding_cache, exp.data.kind, fields)
    return open_source(exp.data.kind, fields)


def build_tokenizer_and_model(
    exp: Experiment, source: Source, ckpt: tuple[Any, Any], image_source: Any, resume: bool
) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, model): a CLIP from the preset or the starting checkpoint, or a LiT model whose text
    tower brings its own tokenizer (a scratch one uses model.tokenizer)."""
    ckpt_model, ckpt_tok = ckpt
    ctx = (ckpt_model.config if ckpt_model is not None else get_config(exp.model.preset)).text.context_length
    if exp.model.lit is None:
        tokenizer = build_tokenizer(exp, source.captions, ckpt_tok, ctx, resume)
        return tokenizer, build_model(exp, tokenizer, ckpt_model)
    tokenizer = None if exp.model.text_tower else build_tokenizer(exp, source.captions, None, ctx, resume)
    model, tokenizer = build_lit(exp, tokenizer, image_source)
    if is_main():
        print(f"LiT {exp.model.lit}: {lit_summary(model)}")
    return tokenizer, model


def lit_summary(model: torch.nn.Module) -> str:
    """'image tower 0 of 5,210,624 parameters trainable (locked); text tower ...' for the log."""
    parts = []
    for label, tower in (("image tower", model.visual), ("text tower", model.text)):
        total = sum(p.numel() for p in tower.parameters())
        trainable = sum(p.numel() for p in tower.parameters() if p.requires_grad)
        state = "locked" if trainable == 0 else "unlocked" if trainable == total else "partly locked"
        parts.append(f"{label} {trainable:,} of {total:,} parameters trainable ({state})")
    return "; ".join(parts)


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
    return SkipReport(stream, source.skips, metrics if dist_info.is_main else None, echo=echo)


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
        **({"pixel_norm": pixel_norm} if pixel_norm is not None else {}),  # for uint8 batches (fast_decode)
    )


def tower_identity(exp: Experiment, model: torch.nn.Module) -> dict[str, str]:
    """Weights hashes of the pretrained towers a LiT run starts from, taken before training: a resume whose
    model.image_tower / text_tower now holds other weights is refused (the checkpoint would silently keep
    the old ones)."""
    from ..data.embedding_cache import weights_hash

    out = {}
    if exp.model.lit is not None:
        for key, tower in (("image_tower", model.visual), ("text_tower", model.text)):
            if getattr(exp.model, key):
                out[key] = weights_hash(tower)
    return out


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
    tokenizer, model = build_tokenizer_and_model(exp, source, (ckpt_model, ckpt_tok), image_source, resume)
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
    evaluators = build_evaluators(exp, source, preprocess, tokenizer)
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


def run_experiment(exp: Experiment, resume: bool = False, progress: bool = True) -> TrainResult:
    """Build and fit; one run per output directory (rank 0 holds the lock for the run's life)."""
    lock = RunLock(exp.run.output_dir).acquire() if is_main() else None
    try:
        built = build_trainer(exp, progress=progress, resume=resume)
        result = built.trainer.fit(resume=resume)
        if hasattr(built.data, "finish"):
            built.data.finish()  # the skip counts of the epoch the run ended in
        module = built.exported_module()  # FSDP2: gathered on every rank
        if module is not None:
            export_model(module, built.tokenizer, exp.run.output_dir, built.preprocess)
        barrier()  # every rank leaves together: none tears the process group down under another
    finally:
        cleanup()  # leave the process group (torchrun runs); nothing in a single process
        if lock is not None:
            lock.release()
    return result
