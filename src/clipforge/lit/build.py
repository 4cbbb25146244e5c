"""Build a LiT model: towers from pretrained sources (or random), frozen as a `LiTPolicy` says.

    model, tokenizer = build_lit_model("Lu", image="runs/pretrain/classifier", tokenizer=bpe)
    model, tokenizer = build_lit_model("LU", image="ckpt/ViT-B-32.pt", text="models/all-MiniLM-L6-v2")

Image sources: any checkpoint `clipforge.load` reads (its image tower is taken) or a clipforge
image-classifier directory (`clipforge pretrain-image`). Text sources: any `clipforge.load` checkpoint
(its text tower and tokenizer) or a local HF BERT-family directory (AutoModel + its own tokenizer,
CLS or mean pooling, a new linear projection: LiT's head on the text side only).

The joint embedding is the image tower's output: a pretrained image tower keeps its own projection
(locked with it); the text side is projected into it. With `u`, a tower has the source's architecture
(or the preset's when no source is given) and random weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoints.classifier import is_classifier_dir, load_classifier
from ..config import CLIPConfig, TextConfig, VisionConfig, get_config
from ..models.clip import CLIP
from ..models.hf_text import HFTextEncoder, HFTokenizer, is_hf_text_dir
from ..models.towers import build_image_tower
from .locking import LiTPolicy, apply_policy


@dataclass
class ImageTower:
    tower: nn.Module
    config: VisionConfig
    embed_dim: int
    preprocess: dict[str, Any]  # PreprocessConfig fields (image_size, mean, std, ...)


def load_image_tower(source: str | Path) -> ImageTower:
    """The pretrained image tower of a classifier directory or of any `clipforge.load` checkpoint."""
    if is_classifier_dir(source):
        clf, spec = load_classifier(source)
        return ImageTower(clf.visual, clf.vision_config, clf.embed_dim, dict(spec.get("preprocess") or {}))
    from ..checkpoints import read_checkpoint
    from ..checkpoints.io import build_model

    ckpt = read_checkpoint(source)
    model = build_model(ckpt)
    pre = dict(ckpt.spec.get("preprocess") or {})
    pre.setdefault("image_size", ckpt.config.vision.image_size)
    return ImageTower(model.visual, ckpt.config.vision, ckpt.config.embed_dim, pre)


def random_image_tower(config: VisionConfig, embed_dim: int) -> nn.Module:
    tower = build_image_tower(config, embed_dim)
    tower.init_weights()
    return tower


def build_lit_model(
    policy: LiTPolicy | str,
    *,
    preset: str | CLIPConfig = "tiny-vit",
    image: str | Path | ImageTower | None = None,
    text: str | Path | None = None,
    tokenizer: Any = None,
    embed_dim: int | None = None,
    pooling: str = "mean",
    context_length: int | None = None,
) -> tuple[CLIP, Any]:
    """(CLIP model with the policy applied, tokenizer).

    image: a source path, or an `ImageTower` already loaded with `load_image_tower`.
    preset: the architecture of towers without a source (and embed_dim when no image source).
    tokenizer: for a clipforge text tower without a source (its vocabulary sets vocab_size); for a
    checkpoint text source it replaces the checkpoint's own and must have the tower's vocabulary size;
    a HF text source brings its own. context_length: of the text tower (default: tokenizer's / preset's).
    """
    policy = LiTPolicy.parse(policy) if isinstance(policy, str) else policy
    base = get_config(preset)
    if policy.image.pretrained and image is None:
        raise ValueError(
            f"image policy {policy.image.mode!r} needs a pretrained image tower: pass image=<checkpoint>"
        )
    if policy.text.pretrained and text is None:
        raise ValueError(
            f"text policy {policy.text.mode!r} needs a pretrained text tower: "
            "pass text=<checkpoint or HF dir>"
        )

    # Image tower: the joint embedding is its output.
    if image is not None:
        src = image if isinstance(image, ImageTower) else load_image_tower(image)
        vision, dim = src.config, src.embed_dim
        if embed_dim is not None and embed_dim != dim:
            raise ValueError(f"embed_dim={embed_dim} but the image tower {image} outputs {dim} features")
        visual = src.tower if policy.image.pretrained else random_image_tower(vision, dim)
    else:
        vision, dim = base.vision, embed_dim or base.embed_dim
        visual = random_image_tower(vision, dim)

    # Text tower.
    keep: tuple[str, ...] = ()
    text_tower: nn.Module | None = None
    if text is not None and is_hf_text_dir(text):
        hf_tok = HFTokenizer.from_pretrained(text, context_length or (tokenizer_ctx(tokenizer) or 64))
        text_tower = HFTextEncoder.from_pretrained(
            text, dim, pooling=pooling, pretrained=policy.text.pretrained
        )
        tokenizer, keep = hf_tok, ("proj.weight",)  # the new head trains even when the encoder is locked
        # The text config only records context_length / vocab_size (eval reads them): the HF tower is
        # passed to CLIP prebuilt, so no clipforge text tower of this shape is ever built.
        text_cfg = TextConfig(
            context_length=hf_tok.context_length, vocab_size=hf_tok.vocab_size, width=8, heads=1, layers=1
        )
    elif text is not None:
        from ..checkpoints import load

        clip, _, tok = load(text)
        if clip.config.embed_dim != dim:
            raise ValueError(
                f"the text tower of {text} outputs {clip.config.embed_dim} features "
                f"but the image tower {dim}; "
                "use an image tower of the same embedding size "
                "(or a HF text encoder, which gets a new projection)"
            )
        text_cfg = clip.config.text
        if tokenizer is not None and tokenizer.vocab_size != text_cfg.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the text tower of {text} embeds "
                f"{text_cfg.vocab_size}; use the tokenizer the tower was trained with"
            )
        tokenizer = tokenizer if tokenizer is not None else tok
        if tokenizer is None:
            raise ValueError(
                f"text tower {text}: the checkpoint carries no tokenizer for its {text_cfg.vocab_size}-token "
                "vocabulary; use a directory that holds the model with its tokenizer (a clipforge or HF CLIP "
                "directory, e.g. a run's model/), or name its tokenizer: model.tokenizer=<directory> (from "
                "Python, tokenizer=)"
            )
        if policy.text.pretrained:
            text_tower = clip.text
    else:
        if tokenizer is None:
            raise ValueError("a text tower from scratch needs a tokenizer (its vocabulary size)")
        ctx = context_length or base.text.context_length
        text_cfg = dataclasses.replace(base.text, vocab_size=tokenizer.vocab_size, context_length=ctx)

    cfg = dataclasses.replace(base, embed_dim=dim, vision=vision, text=text_cfg)
    model = CLIP(cfg, visual_tower=visual, text_tower=text_tower)
    apply_policy(model, policy, text_keep_trainable=keep)
    return model, tokenizer


def tokenizer_ctx(tokenizer: Any) -> int | None:
    return getattr(tokenizer, "context_length", None)
