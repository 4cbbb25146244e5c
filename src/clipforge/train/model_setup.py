"""The model side of a training run: device, tokenizer, model (preset, checkpoint or LiT towers), input
preprocessing, and the identity of the pretrained towers a resume must keep. Used by train/build.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import CLIPConfig, get_config
from ..data.sources import Source
from ..models import create_model
from ..models.hf_text import is_hf_text_dir
from ..transforms import PreprocessConfig
from .dist import barrier, is_main
from .experiment import Experiment


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
    progress: bool = True,
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
                tqdm(texts, desc="training BPE", leave=False, disable=not progress or len(texts) < 50_000),
                size,
                ctx,
            )
            from ..files import atomic_directory

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
    cfg = preset_config(exp)
    text = dataclasses.replace(
        cfg.text,
        vocab_size=tokenizer.vocab_size,
        context_length=spec.context_length or cfg.text.context_length,
    )
    return create_model(cfg.replace(text=text))


def preset_config(exp: Experiment) -> CLIPConfig:
    """The preset's architecture; with a loss that needs a logit bias (SigLIP) and a preset without one,
    SigLIP's initialisation (Zhai et al. 2023): temperature t' = ln 10 and bias b = -10."""
    from ..loss import get_objective

    cfg = get_config(exp.model.preset)
    if get_objective(exp.train.loss).needs_bias and cfg.init_logit_bias is None:
        cfg = cfg.replace(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    return cfg


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
        preset=preset_config(exp),
        image=image_source,
        text=m.text_tower,
        tokenizer=tokenizer,
        pooling=m.pooling,
        context_length=m.context_length,
    )
    return model.train(), tokenizer


def input_preprocess(exp: Experiment, ckpt_preprocess: Any, image_source: Any) -> PreprocessConfig:
    """The model's input preprocessing: the LiT image tower's, else the checkpoint's, else the preset's."""
    if image_source is not None:  # LiT: the data follows the pretrained image tower's preprocessing
        keep = ("image_size", "mean", "std", "interpolation")
        return PreprocessConfig.from_dict({k: v for k, v in image_source.preprocess.items() if k in keep})
    if getattr(ckpt_preprocess, "config", None) is not None:
        return ckpt_preprocess.config
    return PreprocessConfig(get_config(exp.model.preset).vision.image_size)


def build_tokenizer_and_model(
    exp: Experiment,
    source: Source,
    ckpt: tuple[Any, Any],
    image_source: Any,
    resume: bool,
    progress: bool = True,
) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, model): a CLIP from the preset or the starting checkpoint, or a LiT model whose text
    tower brings its own tokenizer (a scratch one uses model.tokenizer). `progress=False`: no bars."""
    ckpt_model, ckpt_tok = ckpt
    captions = functools.partial(source.captions, progress=progress)  # read only if a BPE is trained
    ctx = (ckpt_model.config if ckpt_model is not None else get_config(exp.model.preset)).text.context_length
    if exp.model.lit is None:
        tokenizer = build_tokenizer(exp, captions, ckpt_tok, ctx, resume, progress)
        return tokenizer, build_model(exp, tokenizer, ckpt_model)
    tokenizer = None
    if lit_text_tokenizer_given(exp):
        tokenizer = build_tokenizer(exp, captions, None, ctx, resume, progress)
    model, tokenizer = build_lit(exp, tokenizer, image_source)
    if is_main():
        print(f"LiT {exp.model.lit}: {lit_summary(model)}")
    return tokenizer, model


def lit_text_tokenizer_given(exp: Experiment) -> bool:
    """Whether model.tokenizer picks the LiT text tower's tokenizer: always for a tower from scratch; for
    a checkpoint tower when set explicitly (instead of its own, which it may lack); never for a HF tower
    (its tokenizer is part of it)."""
    m = exp.model
    if m.text_tower is None:
        return True
    if m.tokenizer in ("auto", "checkpoint") or is_hf_text_dir(m.text_tower):
        return False
    from ..lit.locking import LiTPolicy

    if m.tokenizer == "bpe" and LiTPolicy.parse(m.lit).text.pretrained:
        raise ValueError(
            f"model.tokenizer=bpe learns a new vocabulary, whose ids the pretrained text tower "
            f"{m.text_tower} never saw; use the tokenizer it was trained with (a directory or 'openai')"
        )
    return True


def lit_summary(model: torch.nn.Module) -> str:
    """'image tower 0 of 5,210,624 parameters trainable (locked); text tower ...' for the log."""
    parts = []
    for label, tower in (("image tower", model.visual), ("text tower", model.text)):
        total = sum(p.numel() for p in tower.parameters())
        trainable = sum(p.numel() for p in tower.parameters() if p.requires_grad)
        state = "locked" if trainable == 0 else "unlocked" if trainable == total else "partly locked"
        parts.append(f"{label} {trainable:,} of {total:,} parameters trainable ({state})")
    return "; ".join(parts)


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
