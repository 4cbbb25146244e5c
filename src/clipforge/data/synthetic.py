"""Synthetic shapes: procedurally drawn image-caption pairs, deterministic from a seed, no files needed.

A scene holds 1-3 objects, each a (colour, shape) with a size and a place, on one of several
backgrounds. Captions come from varied templates ("a photo of a large red circle on the left",
"two small blue squares on a gray background", "there is a purple star.") and always put the colour
word directly before the shape word, so a caption names its colour-shape combinations unambiguously.

Compositional split: a fraction of the (colour, shape) combinations is held out. Split "train" (and
"seen_eval") draws objects of seen combinations only, so a held-out combination never appears in a
training image or caption, while every colour and every shape does; "unseen" draws held-out ones.
Zero-shot on unseen combinations ("a purple triangle" when purple things and triangles were seen,
never together) then tests composition. Classification over all COLOURS x SHAPES (64 classes) puts
chance at 1/64.

Distribution shifts for robustness evaluation re-render the same scenes differently: other
backgrounds, textured fills, gaussian noise, outline-only drawing, blur (`SHIFTS`).

Every sample is drawn from its own RNG keyed by (seed, split, index), so `make_pairs(cfg, n)[:k]`
equals `make_pairs(cfg, k)` and the same seed gives the same bytes on every machine.

Written words (opt-in, `text_rate` > 0): that share of the *training* pairs also shows a word on a white
sign (a colour or shape name by default, unrelated to the objects drawn) and says so in the caption ("a
sign that says red"), so a model can learn to read -- and then be fooled by the typographic attack
(clipforge.eval.typographic). The words come from a separate RNG stream, so with text_rate = 0 (the
default) every image and caption is exactly what it was without the option.

Layout: `synthetic_scenes.py` holds the config, vocabulary, combinations and captions (no pixels) and
this module draws them; every public name of both is importable from here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .drawing import COLOURS, SHAPES, ShapeObject, render_objects
from .synthetic_scenes import (
    BACKGROUNDS,
    COUNT_TEMPLATES,
    MULTI_TEMPLATES,
    NUMBER_WORDS,
    PLURALS,
    POSITION_PHRASES,
    POSITIONS,
    RELATION_TEMPLATES,
    SHIFT_BACKGROUNDS,
    SHIFTS,
    SINGLE_TEMPLATES,
    SIZE_WORDS,
    SPLITS,
    TEXT_TEMPLATES,
    ShapesConfig,
    Split,
    _scene,
    _scene_rng,
    _with_word,
    _written_word,
    all_combos,
    combo_classnames,
    holdout_combos,
    make_captions,
    seen_combos,
    split_combos,
)
from .text_overlay import TextStyle, draw_word

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "COUNT_TEMPLATES",
    "MULTI_TEMPLATES",
    "NUMBER_WORDS",
    "PLURALS",
    "POSITIONS",
    "POSITION_PHRASES",
    "RELATION_TEMPLATES",
    "SHAPES",
    "SHIFTS",
    "SHIFT_BACKGROUNDS",
    "SINGLE_TEMPLATES",
    "SIZE_WORDS",
    "SPLITS",
    "TEXT_TEMPLATES",
    "Scene",
    "ShapesConfig",
    "Split",
    "all_combos",
    "classification_set",
    "combo_classnames",
    "holdout_combos",
    "images_to_tensor",
    "make_captions",
    "make_pairs",
    "make_scenes",
    "make_tensors",
    "render_scene",
    "seen_combos",
    "split_combos",
]


@dataclass
class Scene:
    image: Image.Image
    caption: str
    objects: tuple[ShapeObject, ...]
    background: str
    kind: str  # "single" | "count" | "multi"
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ drawing
def _check_shift(shift: str) -> None:
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; choose from {SHIFTS}")


def render_scene(
    cfg: ShapesConfig,
    split: str,
    index: int,
    shift: str = "none",
    kind: str | None = None,
    combos: Sequence[tuple[str, str]] | None = None,
    stream: str = "pairs",
) -> Scene:
    """Scene number `index` of a split, deterministic in (cfg.seed, stream, split, index). The scene
    content does not depend on `shift`: a shifted variant draws the same objects differently."""
    _check_shift(shift)
    combos = split_combos(cfg, split) if combos is None else combos
    rng = _scene_rng(cfg, stream, split, index)
    objects, caption, bg, bg_variant, kind = _scene(cfg, combos, rng, BACKGROUNDS, kind)
    shift_rng = random.Random(f"{cfg.seed}/{stream}/{split}/{index}/{shift}")
    if shift == "background":  # same scene, a background never seen in training
        bg, bg_variant = shift_rng.choice(list(SHIFT_BACKGROUNDS)), shift_rng.randrange(4)
    noise_seed = (cfg.seed, SPLITS.index(split) if split in SPLITS else 9, index, 17)
    image = render_objects(cfg.image_size, objects, bg, bg_variant, shift, shift_rng, noise_seed)
    written = _written_word(cfg, stream, split, index)
    meta = {}
    if written is not None:
        word, template = written
        place = random.Random(f"{cfg.seed}/{stream}/{split}/{index}/text-place")
        image = draw_word(image, word, TextStyle(font_size=0.22, position="random", contrast="box"), place)
        caption, meta = _with_word(caption, word, template), {"word": word}
    return Scene(image, caption, tuple(objects), bg, kind, meta)


def make_scenes(
    cfg: ShapesConfig, n: int, split: Split = "train", shift: str = "none", start: int = 0
) -> list[Scene]:
    """Scenes start .. start+n-1 of a split (images, captions and the objects drawn)."""
    return [render_scene(cfg, split, i, shift) for i in range(start, start + n)]


def make_pairs(
    cfg: ShapesConfig, n: int, split: Split = "train", shift: str = "none", start: int = 0
) -> list[tuple[Image.Image, str]]:
    """n (PIL RGB image, caption) pairs of a split; see the module docstring for the splits."""
    return [(sc.image, sc.caption) for sc in make_scenes(cfg, n, split, shift, start)]


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """uint8 (N, 3, H, W) from equally sized RGB PIL images."""
    if not images:
        return torch.zeros(0, 3, 0, 0, dtype=torch.uint8)
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])  # (N, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def make_tensors(
    cfg: ShapesConfig, n: int, split: Split = "train", shift: str = "none", start: int = 0
) -> tuple[torch.Tensor, list[str]]:
    """Pre-rendered pairs: (uint8 images (n, 3, S, S), captions) -- for TensorPairs."""
    pairs = make_pairs(cfg, n, split, shift, start)
    return images_to_tensor([im for im, _ in pairs]), [c for _, c in pairs]


def classification_set(
    cfg: ShapesConfig,
    n_per_class: int,
    split: Split = "unseen",
    label: str = "combo",
    shift: str = "none",
    classes: str = "all",
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A labelled set of single-object images: (uint8 images (N, 3, S, S), labels (N,), classnames).

    label="combo": classes are colour-shape combinations ("purple triangle"); images show the
      combinations of `split` (unseen -> held-out ones); with classes="all" the class list is every
      combination (chance = 1 / (C * S)) and labels index into it, with classes="split" only the split's.
    label="shape" / "colour": classes are shapes / colours ("triangle"), images of the split's
      combinations -- an image-classification task sharing no captions (e.g. to pretrain an image tower).
    Balanced: n_per_class images per combination of the split (combo) or per class (shape/colour).
    """
    _check_shift(shift)
    combos = split_combos(cfg, split)
    if label == "combo":
        classnames = combo_classnames(all_combos(cfg) if classes == "all" else combos)
        if classes not in ("all", "split"):
            raise ValueError(f"classes must be 'all' or 'split', got {classes!r}")
        groups = [(classnames.index(f"{c} {s}"), [(c, s)]) for c, s in combos]
    elif label in ("shape", "colour"):
        names = list(cfg.shapes if label == "shape" else cfg.colours)
        pos = 1 if label == "shape" else 0
        groups = [(k, [cs for cs in combos if cs[pos] == name]) for k, name in enumerate(names)]
        groups = [(k, g) for k, g in groups if g]
        classnames = names
    else:
        raise ValueError(f"label must be 'combo', 'shape' or 'colour', got {label!r}")
    images, labels = [], []
    stream = f"cls-{label}"
    for j in range(n_per_class):
        for k, group in groups:
            combo = [group[j % len(group)]]
            scene = render_scene(cfg, split, len(labels), shift, kind="single", combos=combo, stream=stream)
            images.append(scene.image)
            labels.append(k)
    return images_to_tensor(images), torch.tensor(labels, dtype=torch.long), classnames
