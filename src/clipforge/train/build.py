"""From an `Experiment` to a running `Trainer`: model, tokenizer, data, step, evaluators, export.

    result = run_experiment(load_experiment("run.yaml", ["train.steps=100"]), resume=True)
    model, preprocess, tokenizer = clipforge.load("runs/x/model")

This is the only place that knows both the experiment config and CLIP; the trainer itself does not.
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
from ..data.memory import TensorPairs
from ..models import create_model
from ..transforms import normalise_uint8
from .distributed import (
    DistributedLoss,
    barrier,
    cleanup,
    init_distributed,
    is_fsdp,
    is_main,
    meta_copy,
    model_state_dict,
    shard_fsdp,
    wrap_ddp,
)
from .experiment import Experiment
from .optim import build_optimizer, cosine_schedule
from .runs import RunDir, seed_everything
from .step import make_step_fn
from .trainer import BatchStream, Trainer, TrainResult


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
            tok.save(saved)
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


def cached_pairs(exp: Experiment, model: torch.nn.Module, tokens: torch.Tensor):
    """CachedPairs over `data.embedding_cache`, checked against the locked tower and the training set."""
    from ..data.embedding_cache import CachedPairs, CacheMismatchError, EmbeddingCache, weights_hash

    cache = EmbeddingCache(exp.data.embedding_cache)
    where = exp.data.embedding_cache
    made = cache.index["fingerprint"]
    if made.get("weights") != weights_hash(model.visual):
        raise CacheMismatchError(
            f"{where}: made by another image tower than model.image_tower={exp.model.image_tower}; "
            "rebuild it with `clipforge cache-embeddings --tower <that tower>`"
        )
    data = f"synthetic:{exp.run.seed}:{exp.data.synthetic_train}"
    if made.get("preprocess", {}).get("data") != data:
        raise CacheMismatchError(
            f"{where}: holds embeddings of {made.get('preprocess', {}).get('data')!r} but the training "
            f"set is {data!r}; run `clipforge cache-embeddings --data synthetic --seed {exp.run.seed} "
            f"--synthetic-n {exp.data.synthetic_train}`"
        )
    return CachedPairs(cache, tokens)


def synthetic_data(exp: Experiment, image_size: int):
    """(train images uint8, captions, evaluation sets) of the synthetic shapes set."""
    from ..data.synthetic import ShapesConfig, classification_set, make_tensors

    shapes = ShapesConfig(image_size=image_size, seed=exp.run.seed)
    images, captions = make_tensors(shapes, exp.data.synthetic_train, "train")
    per_class = max(1, exp.data.synthetic_val // len(shapes.colours) // len(shapes.shapes))
    seen = classification_set(shapes, per_class, "seen_eval", classes="all")
    unseen = classification_set(shapes, per_class, "unseen", classes="all")
    ret_images, ret_caps = make_tensors(shapes, exp.data.synthetic_val, "seen_eval")
    return images, captions, {"seen": seen, "unseen": unseen, "retrieval": (ret_images, ret_caps)}


def synthetic_evaluators(sets: dict[str, Any], tokenizer) -> dict[str, Any]:
    from ..eval import RetrievalEvaluator, ZeroShotEvaluator

    templates = ["a {}.", "a photo of a {}.", "there is a {}."]
    evs: dict[str, Any] = {}
    for name in ("seen", "unseen"):
        x, y, classnames = sets[name]
        evs[f"zeroshot_{name}"] = ZeroShotEvaluator(classnames, templates, normalise_uint8(x), y)
    x, caps = sets["retrieval"]
    evs["retrieval"] = RetrievalEvaluator(normalise_uint8(x), caps, torch.arange(len(caps)))
    return {k: (lambda m, ev=ev: ev.run(m, tokenizer)) for k, ev in evs.items()}


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


def _train_transform(exp: Experiment, cfg):
    from ..transforms import eval_transform, train_transform

    if exp.data.augment == "none":
        return eval_transform(cfg)
    return train_transform(cfg, mode=exp.data.augment)


def build_trainer(exp: Experiment, progress: bool = True, resume: bool = False) -> Built:
    """Everything `trainer.fit(resume=...)` needs, from the experiment config."""
    from ..transforms import PreprocessConfig, eval_transform
    from .data_sources import SkipReport, TrainSource, file_evaluators

    seed_everything(exp.run.seed)
    # torchrun: join the process group (NCCL/gloo); a single process otherwise. train.batch_size is global.
    dist_info = init_distributed(resolve_device(exp.train.device))
    device = dist_info.device
    if exp.train.batch_size % dist_info.world_size:
        raise ValueError(
            f"train.batch_size={exp.train.batch_size} (the global batch) does not split over "
            f"{dist_info.world_size} processes"
        )
    if exp.data.embedding_cache and dist_info.distributed:
        raise NotImplementedError("data.embedding_cache trains in one process only for now (no torchrun)")
    ckpt_model = ckpt_preprocess = ckpt_tok = None
    if exp.model.checkpoint:
        from ..checkpoints import load

        ckpt_model, ckpt_preprocess, ckpt_tok = load(exp.model.checkpoint)
    cfg = ckpt_model.config if ckpt_model is not None else get_config(exp.model.preset)
    preprocess = getattr(ckpt_preprocess, "config", None) or PreprocessConfig(cfg.vision.image_size)
    image_source = lit_image_source(exp)
    if image_source is not None:  # LiT: the data follows the pretrained image tower's preprocessing
        preprocess = PreprocessConfig.from_dict(
            {
                k: v
                for k, v in image_source.preprocess.items()
                if k in ("image_size", "mean", "std", "interpolation")
            }
        )
    ctx = cfg.text.context_length
    run_dir = RunDir(exp.run.output_dir)
    t = exp.train
    if exp.data.kind == "synthetic":
        images, captions, sets = synthetic_data(exp, preprocess.image_size)
        if exp.model.lit is None:
            tokenizer = build_tokenizer(exp, captions, ckpt_tok, ctx, resume)
            model = build_model(exp, tokenizer, ckpt_model)
        else:  # a text_tower brings its own tokenizer; a scratch one uses model.tokenizer
            tokenizer = None if exp.model.text_tower else build_tokenizer(exp, captions, None, ctx, resume)
            model, tokenizer = build_lit(exp, tokenizer, image_source)
        ctx = model.config.text.context_length
        tokens = tokenizer(captions, context_length=ctx, truncate=True)
        if exp.data.embedding_cache:
            dataset: Any = cached_pairs(exp, model, tokens)
        else:
            dataset = TensorPairs(images, tokens)
        data: Any = BatchStream(
            dataset,
            t.batch_size,
            seed=exp.run.seed,
            shuffle=exp.data.shuffle,
            workers=exp.data.workers,
            pin_memory=device.type == "cuda",
            rank=dist_info.rank,
            world_size=dist_info.world_size,
        )
        evaluators = synthetic_evaluators(sets, tokenizer)
    else:
        source = TrainSource(exp)
        if exp.model.lit is None:
            tokenizer = build_tokenizer(exp, source.captions, ckpt_tok, ctx, resume)
            model = build_model(exp, tokenizer, ckpt_model)
        else:
            tokenizer = (
                None if exp.model.text_tower else build_tokenizer(exp, source.captions, None, ctx, resume)
            )
            model, tokenizer = build_lit(exp, tokenizer, image_source)
        ctx = model.config.text.context_length
        source.attach(_train_transform(exp, preprocess), tokenizer, ctx)
        stream = source.stream(
            t.batch_size,
            exp.run.seed,
            pin_memory=device.type == "cuda",
            rank=dist_info.rank,
            world_size=dist_info.world_size,
        )
        echo = (tqdm.write if progress else print) if dist_info.is_main else (lambda msg: None)
        metrics = run_dir.metrics if dist_info.is_main else None  # rank 0 alone writes
        data = SkipReport(stream, source.skips, metrics, echo=echo)
        evaluators = file_evaluators(exp, eval_transform(preprocess), tokenizer)
    model = model.to(device)
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    export_template = None
    if t.strategy == "fsdp" and dist_info.distributed:
        # FSDP2 replaces the parameters by sharded ones: shard before the optimizer sees them. A meta-device
        # copy (no memory) receives the gathered weights on rank 0 to export the trained model.
        export_template = meta_copy(model) if dist_info.is_main else None
        model = shard_fsdp(model, unit=t.fsdp_unit)
    o = exp.optim
    optimizer = build_optimizer(model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
    if o.schedule == "cosine":
        scheduler = cosine_schedule(optimizer, o.warmup_steps, t.steps, o.min_lr / o.lr if o.lr else 0.0)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / max(1, o.warmup_steps))
        )
    if t.strategy == "ddp":
        model = wrap_ddp(model)  # several processes: DDP (after the optimizer saw the plain parameter names)
    loss = DistributedLoss(t.loss, t.loss_mode, t.lam)  # one process: exactly get_loss(t.loss)
    if exp.data.embedding_cache:  # batches of {"image_embedding", "text"}: the image tower never runs
        from .lit_step import make_lit_step_fn

        step_fn = make_lit_step_fn(loss, lam=t.lam, accum_steps=t.accum_steps)
    else:
        step_fn = make_step_fn(
            loss,
            lam=t.lam,
            accum_steps=t.accum_steps,
            mask_ratio=t.mask_ratio,
            unmasked_from_step=t.steps - t.unmasked_steps if t.unmasked_steps else None,
        )

    def scalars(m):
        out = {"logit_scale": m.logit_scale.exp().item()}
        if m.logit_bias is not None:
            out["logit_bias"] = m.logit_bias.item()
        return out

    r = exp.run
    trainer = Trainer(
        model,
        step_fn,
        optimizer,
        scheduler,
        data,
        steps=t.steps,
        batch_size=t.batch_size,
        run_dir=run_dir,
        config=exp.to_dict(),
        precision=t.precision,
        grad_clip=o.grad_clip,
        evaluators=evaluators,
        eval_every=r.eval_every,
        checkpoint_every=r.checkpoint_every,
        keep_last=r.keep_last,
        log_every=r.log_every,
        max_nonfinite=t.max_nonfinite,
        after_step=lambda m: m.clamp_logit_scale(),
        scalars=scalars,
        progress=progress,
        tensorboard=r.tensorboard,
    )
    return Built(trainer, tokenizer, preprocess, data, export_template)


def export_model(model: torch.nn.Module, tokenizer, out_dir: str | Path, preprocess=None) -> Path | None:
    """save_pretrained into out_dir/model: `clipforge.load(out_dir / "model")` gives the model back.

    A LiT model with a HF text tower has no clipforge checkpoint format yet: nothing is exported (the
    run's checkpoints hold its weights) and None is returned."""
    from ..checkpoints import save_pretrained
    from ..models.hf_text import HFTextEncoder
    from ..transforms import PreprocessConfig

    if isinstance(model.text, HFTextEncoder):
        print(
            f"note: {out_dir}/model not written: a HF text tower has no clipforge checkpoint format yet; "
            f"the weights are in the run checkpoints under {out_dir}"
        )
        return None
    path = Path(out_dir) / "model"
    preprocess = preprocess or PreprocessConfig(model.config.vision.image_size)
    save_pretrained(model, path, tokenizer=tokenizer, preprocess=preprocess)
    return path


def run_experiment(exp: Experiment, resume: bool = False, progress: bool = True) -> TrainResult:
    built = build_trainer(exp, progress=progress, resume=resume)
    try:
        result = built.trainer.fit(resume=resume)
        if hasattr(built.data, "finish"):
            built.data.finish()  # the skip counts of the epoch the run ended in
        module = built.exported_module()  # FSDP2: gathered on every rank
        if module is not None:
            export_model(module, built.tokenizer, exp.run.output_dir, built.preprocess)
    finally:
        cleanup()  # leave the process group (torchrun runs); nothing in a single process
    return result
