"""Drawing the synthetic shapes: shape outlines, backgrounds, textured fills and the shifted renderings.

All shapes are polygons of radius 1 scaled to the object (circles are PIL ellipses); backgrounds and
textures are small cached arrays, so a 64 px scene renders in well under a millisecond.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "heart")
SIZES = {"small": 0.12, "large": 0.21}  # object radius as a fraction of the image side


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    size: str  # "small" | "large"
    x: float  # centre, pixels
    y: float
    position: str | None = None  # named region for single-object scenes


def _unit_polygon(shape: str) -> np.ndarray | None:
    """Outline points of a shape of radius 1 centred at 0 (y down); None for circles (drawn as ellipses)."""
    return _UNIT_POLYGONS.get(shape)


def _regular(n: int, start: float, radius: float = 1.0) -> list[tuple[float, float]]:
    return [
        (radius * math.cos(start + 2 * math.pi * k / n), radius * math.sin(start + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star() -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        a, r = -math.pi / 2 + k * math.pi / 5, 1.0 if k % 2 == 0 else 0.42
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _heart() -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    y = y - (y.max() + y.min()) / 2
    s = max(np.abs(x).max(), np.abs(y).max())
    return list(zip((x / s).tolist(), (y / s).tolist(), strict=True))


_W = 0.34  # half-width of a cross arm
_UNIT_POLYGONS = {
    name: np.asarray(pts, dtype=np.float64)
    for name, pts in {
        "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
        "triangle": [(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)],
        "star": _star(),
        "hexagon": _regular(6, 0.0),
        "cross": [
            (-_W, -1),
            (_W, -1),
            (_W, -_W),
            (1, -_W),
            (1, _W),
            (_W, _W),
            (_W, 1),
            (-_W, 1),
            (-_W, _W),
            (-1, _W),
            (-1, -_W),
            (-_W, -_W),
        ],
        "diamond": [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)],
        "heart": _heart(),
    }.items()
}


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    *,
    fill=None,
    outline=None,
    width: int = 1,
) -> None:
    poly = _unit_polygon(shape)
    if poly is None:  # circle
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        pts = [(cx + r * px, cy + r * py) for px, py in poly.tolist()]
        draw.polygon(pts, fill=fill, outline=outline, width=width)


@functools.lru_cache(maxsize=128)
def _background(name: str, size: int, variant: int) -> np.ndarray:
    """(size, size, 3) uint8 background; `variant` picks one of a few deterministic random versions."""
    S = size
    ramp = np.linspace(0.0, 1.0, S)[:, None, None]  # (S, 1, 1), top -> bottom
    plain = {
        "gray": (128, 128, 128),
        "brown": (120, 85, 60),
        "teal": (30, 110, 110),
        "olive": (110, 110, 50),
        "pink": (225, 150, 175),
        "navy": (30, 40, 100),
    }
    rng = np.random.default_rng([size, variant, sum(map(ord, name))])
    if name in plain:
        arr = np.broadcast_to(np.asarray(plain[name], np.float64), (S, S, 3))
    elif name == "gradient":  # dark-to-light gray, top to bottom or the reverse
        lo, hi = (70, 185) if variant % 2 == 0 else (185, 70)
        arr = np.broadcast_to(lo + (hi - lo) * ramp, (S, S, 3))
    elif name == "grainy":  # gray with smooth blotches
        coarse = rng.normal(0, 1, (8, 8)).astype(np.float32)
        blot = np.asarray(Image.fromarray(coarse, mode="F").resize((S, S), Image.Resampling.BICUBIC))
        arr = np.broadcast_to((125 + 22 * blot)[:, :, None], (S, S, 3))
    elif name == "checkered":
        cell = max(2, S // 8)
        ij = (np.arange(S)[:, None] // cell + np.arange(S)[None, :] // cell + variant) % 2
        arr = np.where(ij[:, :, None] == 1, 165.0, 95.0) * np.ones(3)
    elif name == "striped":
        period = max(4, S // 6)
        d = (np.arange(S)[:, None] + np.arange(S)[None, :] + variant * 2) % period < period // 2
        arr = np.where(d[:, :, None], np.array([90.0, 130.0, 90.0]), np.array([150.0, 110.0, 150.0]))
    elif name == "rainbow":
        hue = (np.linspace(0, 1, S)[None, :] + variant / 4) % 1.0
        rgb = 0.5 + 0.5 * np.cos(2 * np.pi * (hue[:, :, None] + np.array([0.0, 1 / 3, 2 / 3])))
        arr = np.broadcast_to(80 + 100 * rgb, (S, S, 3))
    else:
        raise ValueError(f"unknown background {name!r}")
    return np.ascontiguousarray(np.clip(arr, 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=256)
def _texture(colour: str, size: int, variant: int) -> Image.Image:
    """A full-size patterned fill in `colour` and a shade of it: stripes (3 orientations) or dots."""
    S = size
    base = np.asarray(COLOURS[colour], np.float64)
    shade = base * 0.5 + 0.5 * 110  # pulled towards mid gray, so black and white get a visible pattern too
    y, x = np.mgrid[0:S, 0:S]
    period = max(3, S // 12)
    kind = variant % 4
    if kind == 0:
        on = (y // (period // 2 + 1)) % 2 == 0
    elif kind == 1:
        on = (x // (period // 2 + 1)) % 2 == 0
    elif kind == 2:
        on = ((x + y) // (period // 2 + 1)) % 2 == 0
    else:
        on = ((x % period - period / 2) ** 2 + (y % period - period / 2) ** 2) > (period / 3) ** 2
    arr = np.where(on[:, :, None], base, shade)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def render_objects(
    size: int,
    objects: Sequence[ShapeObject],
    background: str,
    bg_variant: int,
    shift: str,
    rng: random.Random,
    noise_seed: Sequence[int],
) -> Image.Image:
    """Draw `objects` on a background; `shift` changes how (see synthetic.SHIFTS)."""
    S = size
    img = Image.fromarray(_background(background, S, bg_variant))
    draw = ImageDraw.Draw(img)
    for o in objects:
        r = SIZES[o.size] * S
        if shift == "texture":
            mask = Image.new("L", (S, S), 0)
            _draw_shape(ImageDraw.Draw(mask), o.shape, o.x, o.y, r, fill=255)
            img.paste(_texture(o.colour, S, rng.randrange(4)), (0, 0), mask)
        elif shift == "style":  # outline only, like a sketch
            _draw_shape(draw, o.shape, o.x, o.y, r, outline=COLOURS[o.colour], width=max(1, round(S / 28)))
        else:
            _draw_shape(draw, o.shape, o.x, o.y, r, fill=COLOURS[o.colour])
    if shift == "noise":
        noise = np.random.default_rng(list(noise_seed)).normal(0.0, 25.0, (S, S, 3))
        img = Image.fromarray(np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8))
    elif shift == "blur":
        img = img.filter(ImageFilter.GaussianBlur(radius=S / 40))
    return img


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image for tests and benchmarks of the image pipeline (JPEG size and decode cost
    of a real photo): smooth colour regions, a few sharp-edged objects, fine texture and sensor noise."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (height // 48 + 2, width // 48 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0.0, 5.0, (height, width, 1)) + rng.normal(0.0, 2.0, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
