"""Synthetic shapes before any pixel is drawn: the config, the vocabulary, the held-out (colour, shape)
combinations of the compositional split, and each scene's objects, placement and caption.

`synthetic.py` draws these scenes (images, tensors, labelled sets) and re-exports every public name here;
this module imports nothing from it.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .drawing import COLOURS, SHAPES, SIZES, ShapeObject

PLURALS = {s: s + "es" if s.endswith("ss") else s + "s" for s in SHAPES}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITIONS = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
# Backgrounds of the base distribution and the unseen ones of the "background" shift; name -> caption words.
BACKGROUNDS = {
    "gray": "gray",
    "brown": "brown",
    "teal": "teal",
    "olive": "olive",
    "gradient": "gradient",
    "grainy": "grainy",
}
SHIFT_BACKGROUNDS = {
    "pink": "pink",
    "navy": "navy",
    "checkered": "checkered",
    "striped": "striped",
    "rainbow": "rainbow",
}
SHIFTS = ("none", "background", "texture", "noise", "style", "blur")
SPLITS = ("train", "seen_eval", "unseen", "all")
Split = Literal["train", "seen_eval", "unseen", "all"]
NUMBER_WORDS = {2: "two", 3: "three"}


@dataclass(frozen=True)
class ShapesConfig:
    """What the synthetic set looks like. `holdout_seed` (default: `seed`) picks the held-out combinations."""

    image_size: int = 64
    seed: int = 0
    holdout_fraction: float = 0.2
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    p_single: float = 0.5  # scene kinds: one object / 2-3 copies of one object / 2-3 different objects
    p_count: float = 0.25
    holdout_seed: int | None = None
    text_rate: float = 0.0  # share of training pairs with a written word (0: none, the set is unchanged)
    text_words: tuple[str, ...] = ()  # words to write (default: the colour and shape names)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_words", tuple(self.text_words))
        if not 0.0 <= self.text_rate <= 1.0:
            raise ValueError(f"text_rate must be in [0, 1], got {self.text_rate}")
        object.__setattr__(self, "colours", tuple(self.colours))
        object.__setattr__(self, "shapes", tuple(self.shapes))
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        unknown = [c for c in self.colours if c not in COLOURS] + [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown colours/shapes {unknown}; known: {list(COLOURS)}, {list(SHAPES)}")
        if len(self.colours) < 2 or len(self.shapes) < 2:
            raise ValueError("need at least 2 colours and 2 shapes")
        if not 0.0 <= self.holdout_fraction <= 0.5:
            raise ValueError(f"holdout_fraction must be in [0, 0.5], got {self.holdout_fraction}")
        if not (self.p_single >= 0 and self.p_count >= 0 and self.p_single + self.p_count <= 1):
            raise ValueError(f"p_single ({self.p_single}) + p_count ({self.p_count}) must be in [0, 1]")


# ------------------------------------------------------------------------------------------ combinations
def all_combos(cfg: ShapesConfig = ShapesConfig()) -> list[tuple[str, str]]:
    """Every (colour, shape), colour-major."""
    return [(c, s) for c in cfg.colours for s in cfg.shapes]


def holdout_combos(cfg: ShapesConfig = ShapesConfig()) -> list[tuple[str, str]]:
    """The held-out (colour, shape) combinations, sorted: round(holdout_fraction * C * S) of them, spread
    over "diagonals" of a shuffled colour x shape grid so each colour and each shape loses at most
    ceil(k / C) resp. ceil(k / S) combinations and keeps at least one seen combination."""
    return list(_holdout(cfg))


@functools.lru_cache(maxsize=64)
def _holdout(cfg: ShapesConfig) -> tuple[tuple[str, str], ...]:
    cols, shps = list(cfg.colours), list(cfg.shapes)
    k = round(cfg.holdout_fraction * len(cols) * len(shps))
    rng = random.Random(f"holdout/{cfg.seed if cfg.holdout_seed is None else cfg.holdout_seed}")
    rng.shuffle(cols)
    rng.shuffle(shps)
    n = max(len(cols), len(shps))
    offsets = list(range(n))
    rng.shuffle(offsets)
    out: list[tuple[str, str]] = []
    for d in offsets:  # diagonal d: (cols[i % C], shps[(i + d) % S]) for i in range(n) -- distinct cells
        cells = [(cols[i % len(cols)], shps[(i + d) % len(shps)]) for i in range(n)]
        rng.shuffle(cells)
        out.extend(c for c in cells if c not in out)
        if len(out) >= k:
            break
    held = set(out[:k])
    seen = [(c, s) for c in cols for s in shps if (c, s) not in held]
    lost = (set(cols) - {c for c, _ in seen}) | (set(shps) - {s for _, s in seen})
    if lost:  # cannot happen for holdout_fraction <= 0.5; a guard for odd colour/shape subsets
        raise ValueError(
            f"holdout_fraction={cfg.holdout_fraction} leaves no seen combination for {sorted(lost)}"
        )
    return tuple(sorted(held))


def seen_combos(cfg: ShapesConfig = ShapesConfig()) -> list[tuple[str, str]]:
    held = set(holdout_combos(cfg))
    return [c for c in all_combos(cfg) if c not in held]


def split_combos(cfg: ShapesConfig, split: str) -> list[tuple[str, str]]:
    """The combinations a split draws objects from: train/seen_eval -> seen, unseen -> held out, all."""
    if split in ("train", "seen_eval"):
        return seen_combos(cfg)
    if split == "unseen":
        combos = holdout_combos(cfg)
        if not combos:
            raise ValueError("split 'unseen' needs holdout_fraction > 0")
        return combos
    if split == "all":
        return all_combos(cfg)
    raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")


def combo_classnames(combos: Sequence[tuple[str, str]]) -> list[str]:
    """Zero-shot class names, e.g. 'purple triangle'."""
    return [f"{c} {s}" for c, s in combos]


# ------------------------------------------------------------------------------------------ scenes
def _article(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _place(
    rng: random.Random, S: int, radii: Sequence[float], tries: int = 60
) -> list[tuple[float, float]] | None:
    """Random non-overlapping centres for discs of the given radii (pixels), or None."""
    placed: list[tuple[float, float, float]] = []
    for r in radii:
        for _ in range(tries):
            x, y = rng.uniform(r + 1, S - r - 1), rng.uniform(r + 1, S - r - 1)
            if all((x - px) ** 2 + (y - py) ** 2 > (r + pr + 2) ** 2 for px, py, pr in placed):
                placed.append((x, y, r))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


SINGLE_TEMPLATES = (
    "a {c} {s}",
    "a {z} {c} {s}",
    "a {c} {s} {p}",
    "a photo of a {z} {c} {s} {p}",
    "a photo of a {c} {s}",
    "there is a {c} {s}.",
    "there is a {z} {c} {s} {p}.",
    "a {z} {c} {s} on a {b} background",
    "a {c} {s} on a {b} background, {p}",
    "an image of a {c} {s} {p} on a {b} background",
    "a drawing of a {z} {c} {s}",
    "a picture showing one {c} {s} {p}",
    "one {z} {c} {s} against a {b} backdrop",
    "a simple illustration of a {c} {s}.",
    "{p} there is a {z} {c} {s}",
    "a {b} picture with a {c} {s} {p}",
)
COUNT_TEMPLATES = (
    "{n} {c} {ss}",
    "{n} {z} {c} {ss}",
    "{n} {z} {c} {ss} on a {b} background",
    "a photo of {n} {c} {ss}",
    "there are {n} {c} {ss}.",
    "a picture with {n} {z} {c} {ss}",
    "{n} {c} {ss} against a {b} backdrop",
    "an image showing {n} {c} {ss} on a {b} background",
)
MULTI_TEMPLATES = (
    "{objs}",
    "a photo of {objs}",
    "there is {objs}.",
    "{objs} on a {b} background",
    "a picture with {objs}",
    "an image of {objs} against a {b} backdrop",
)
RELATION_TEMPLATES = ("{o1} {rel} {o2}", "a photo of {o1} {rel} {o2}", "{o1} {rel} {o2} on a {b} background")


def _size_word(rng: random.Random, size: str) -> str:
    return rng.choice(SIZE_WORDS[size])


def _scene(
    cfg: ShapesConfig,
    combos: Sequence[tuple[str, str]],
    rng: random.Random,
    backgrounds: dict[str, str],
    kind: str | None = None,
) -> tuple[list[ShapeObject], str, str, int, str]:
    """(objects, caption, background, background variant, kind) of one random scene."""
    S = cfg.image_size
    bg = rng.choice(list(backgrounds))
    bg_variant = rng.randrange(4)
    b = backgrounds[bg]
    if kind is None:
        u = rng.random()
        kind = "single" if u < cfg.p_single else "count" if u < cfg.p_single + cfg.p_count else "multi"

    if kind == "count":
        c, s = rng.choice(combos)
        n = rng.choice((2, 3))
        size = "small" if n == 3 or rng.random() < 0.5 else "large"
        centres = _place(rng, S, [SIZES[size] * S] * n)
        if centres is not None:
            objs = [ShapeObject(c, s, size, x, y) for x, y in centres]
            tmpl = rng.choice(COUNT_TEMPLATES)
            caption = tmpl.format(n=NUMBER_WORDS[n], z=_size_word(rng, size), c=c, ss=PLURALS[s], b=b)
            return objs, _article(caption), bg, bg_variant, "count"
        kind = "single"  # could not place them (tiny images): fall back

    if kind == "multi":
        n = rng.choice((2, 2, 3))
        picks = rng.sample(list(combos), min(n, len(combos)))
        sizes = ["small" if len(picks) == 3 or rng.random() < 0.5 else "large" for _ in picks]
        centres = _place(rng, S, [SIZES[z] * S for z in sizes])
        if centres is not None and len(picks) >= 2:
            objs = [
                ShapeObject(c, s, z, x, y) for (c, s), z, (x, y) in zip(picks, sizes, centres, strict=True)
            ]
            phrases = [
                f"a {_size_word(rng, o.size)} {o.colour} {o.shape}"
                if rng.random() < 0.5
                else f"a {o.colour} {o.shape}"
                for o in objs
            ]
            if len(objs) == 2 and rng.random() < 0.4:
                o1, o2 = objs
                dx, dy = o2.x - o1.x, o2.y - o1.y
                if abs(dx) > abs(dy):
                    rel = "to the left of" if dx > 0 else "to the right of"
                else:
                    rel = "above" if dy > 0 else "below"
                caption = rng.choice(RELATION_TEMPLATES).format(o1=phrases[0], rel=rel, o2=phrases[1], b=b)
            else:
                joined = (
                    phrases[0] + " and " + phrases[1]
                    if len(phrases) == 2
                    else (f"{phrases[0]}, {phrases[1]} and {phrases[2]}")
                )
                caption = rng.choice(MULTI_TEMPLATES).format(objs=joined, b=b)
            return objs, _article(caption), bg, bg_variant, "multi"

    # single object in a named region
    c, s = rng.choice(combos)
    size = rng.choice(tuple(SIZES))
    pos = rng.choice(tuple(POSITIONS))
    r = SIZES[size] * S
    ax, ay = POSITIONS[pos]
    jitter = 0.07 * S
    x = min(max(ax * S + rng.uniform(-jitter, jitter), r + 1), S - r - 1)
    y = min(max(ay * S + rng.uniform(-jitter, jitter), r + 1), S - r - 1)
    obj = ShapeObject(c, s, size, x, y, pos)
    tmpl = rng.choice(SINGLE_TEMPLATES)
    caption = tmpl.format(c=c, s=s, z=_size_word(rng, size), p=rng.choice(POSITION_PHRASES[pos]), b=b)
    return [obj], _article(caption), bg, bg_variant, "single"


# Captions of a pair with a written word: the scene's caption and the word ({w}).
TEXT_TEMPLATES = (
    "{caption} and a sign that says {w}",
    "{caption}, with the word {w} written on it",
    "a sign that says {w} next to {scene}",
    "{caption}. the sign reads {w}",
    "the word {w} written over {scene}",
)


def _written_word(cfg: ShapesConfig, stream: str, split: str, index: int) -> tuple[str, str] | None:
    """(word, caption template) of pair `index`, or None. Only training pairs get words; the draw is its
    own RNG stream, so the scene itself never changes."""
    if cfg.text_rate <= 0 or stream != "pairs" or split != "train":
        return None
    rng = random.Random(f"{cfg.seed}/{stream}/{split}/{index}/text")
    if rng.random() >= cfg.text_rate:
        return None
    words = cfg.text_words or (*cfg.colours, *cfg.shapes)
    return rng.choice(words), rng.choice(TEXT_TEMPLATES)


def _with_word(caption: str, word: str, template: str) -> str:
    scene = caption.rstrip(".")
    return _article(template.format(caption=scene, w=word, scene=scene))


def _scene_rng(cfg: ShapesConfig, stream: str, split: str, index: int) -> random.Random:
    return random.Random(f"{cfg.seed}/{stream}/{split}/{index}")  # str seeds hash with sha512: portable


def make_captions(cfg: ShapesConfig, n: int, split: Split = "train", start: int = 0) -> list[str]:
    """The captions of make_pairs(cfg, n, split, start=start), without drawing the images."""
    combos = split_combos(cfg, split)
    out = []
    for i in range(start, start + n):
        caption = _scene(cfg, combos, _scene_rng(cfg, "pairs", split, i), BACKGROUNDS)[1]
        written = _written_word(cfg, "pairs", split, i)
        if written is not None:  # the caption render_scene gives
            caption = _with_word(caption, *written)
        out.append(caption)
    return out
