"""From an `Experiment` to a running `Trainer`: model, tokenizer, data, step, evaluators, export.

This is the only place that knows both the experiment config and CLIP; the trainer itself does not.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..config import get_config
from ..data.memory import TensorPairs
from ..models import create_model
from .experiment import Experiment
from .optim import build_optimizer, cosine_schedule
from .runs import RunDir, seed_everything
from .step import make_step_fn
from .trainer import BatchStream, Trainer, TrainResult


def normalise_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> OpenAI-normalised float."""
    from ..transforms import OPENAI_MEAN, OPENAI_STD

    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_tokenizer(exp: Experiment, captions: list[str] | None):
    from ..tokenizer import Tokenizer, train_bpe

    spec = exp.model
    ctx = spec.context_length or get_config(spec.preset).text.context_length
    if spec.tokenizer == "openai":
        return (
            Tokenizer.from_openai_vocab(context_length=ctx)
            if _accepts_ctx()
            else Tokenizer.from_openai_vocab()
        )
    if spec.tokenizer == "bpe":
        if not captions:
            raise ValueError("model.tokenizer=bpe needs the training captions (data.kind=synthetic for now)")
        size = spec.vocab_size or get_config(spec.preset).text.vocab_size
        return train_bpe(captions, vocab_size=size, context_length=ctx)
    path = Path(spec.tokenizer)
    if not path.exists():
        raise FileNotFoundError(
            f"model.tokenizer: no such tokenizer directory: {path} (or use 'openai' / 'bpe')"
        )
    return Tokenizer.load(path)


def _accepts_ctx() -> bool:
    import inspect

    from ..tokenizer import Tokenizer

    return "context_length" in inspect.signature(Tokenizer.from_openai_vocab).parameters


def build_model(exp: Experiment, tokenizer) -> torch.nn.Module:
    spec = exp.model
    if spec.checkpoint:
        from ..checkpoints import load

        model, _, _ = load(spec.checkpoint)
        return model
    cfg = get_config(spec.preset)
    text = dataclasses.replace(
        cfg.text,
        vocab_size=tokenizer.vocab_size,
        context_length=spec.context_length or cfg.text.context_length,
    )
    return create_model(cfg.replace(text=text))


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


def build_trainer(exp: Experiment, progress: bool = True) -> tuple[Trainer, Any]:
    """(trainer, tokenizer) for an experiment; `trainer.fit(resume=...)` runs it."""
    seed_everything(exp.run.seed)
    device = resolve_device(exp.train.device)
    image_size = get_config(exp.model.preset).vision.image_size
    if exp.data.kind != "synthetic":
        raise ValueError(
            f"data.kind={exp.data.kind!r} is not wired into `clipforge train` yet; use data.kind=synthetic"
        )
    images, captions, sets = synthetic_data(exp, image_size)
    tokenizer = build_tokenizer(exp, captions)
    model = build_model(exp, tokenizer).to(device)
    if exp.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    ctx = model.config.text.context_length
    dataset = TensorPairs(images, tokenizer(captions, context_length=ctx, truncate=True))
    t = exp.train
    data = BatchStream(
        dataset,
        t.batch_size,
        seed=exp.run.seed,
        shuffle=exp.data.shuffle,
        workers=exp.data.workers,
        pin_memory=device.type == "cuda",
    )
    o = exp.optim
    optimizer = build_optimizer(model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
    if o.schedule == "cosine":
        scheduler = cosine_schedule(optimizer, o.warmup_steps, t.steps, o.min_lr / o.lr if o.lr else 0.0)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / max(1, o.warmup_steps))
        )
    step_fn = make_step_fn(
        t.loss,
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
        run_dir=RunDir(r.output_dir),
        config=exp.to_dict(),
        precision=t.precision,
        grad_clip=o.grad_clip,
        evaluators=synthetic_evaluators(sets, tokenizer),
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
    return trainer, tokenizer


def export_model(model: torch.nn.Module, tokenizer, out_dir: str | Path) -> Path | None:
    """save_pretrained into out_dir/model (clipforge.load-able); None without the checkpoints module."""
    try:
        from ..checkpoints import save_pretrained
    except ImportError:
        return None
    from ..transforms import PreprocessConfig

    path = Path(out_dir) / "model"
    save_pretrained(
        model, path, tokenizer=tokenizer, preprocess=PreprocessConfig(model.config.vision.image_size)
    )
    return path


def run_experiment(exp: Experiment, resume: bool = False, progress: bool = True) -> TrainResult:
    trainer, tokenizer = build_trainer(exp, progress=progress)
    result = trainer.fit(resume=resume)
    export_model(trainer.model, tokenizer, exp.run.output_dir)
    return result
