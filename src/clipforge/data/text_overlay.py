"""Words written onto images: the typographic attack (Goh et al. 2021) and the synthetic set's signs.

`draw_word(image, "apple", TextStyle(...))` writes one word, shrinking the font until it fits the width.
The default font is Pillow's bundled one (`ImageFont.load_default(size=...)`), so the same call gives the
same pixels on every machine with the same Pillow; `TextStyle.font` names a TrueType file or a font name
FreeType finds on the system (e.g. "DejaVuSans-Bold.ttf") instead.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

POSITIONS = ("center", "top", "bottom", "random")
CONTRASTS = ("box", "high", "low")  # black on a white label | black or white by background | near it


@dataclass(frozen=True)
class TextStyle:
    """How a word is written. font_size: a fraction of the image height (< 1) or pixels (>= 1); contrast
    "box" puts black text on a white label (a handwritten sign), "high" picks black or white against
    the background under the text, "low" a colour only a little off that background."""

    font_size: float = 0.25
    position: str = "center"
    contrast: str = "box"
    font: str | None = None

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"text position {self.position!r}: choose one of {', '.join(POSITIONS)}")
        if self.contrast not in CONTRASTS:
            raise ValueError(f"text contrast {self.contrast!r}: choose one of {', '.join(CONTRASTS)}")
        if self.font_size <= 0:
            raise ValueError(f"font_size must be positive, got {self.font_size}")


@functools.lru_cache(maxsize=64)
def load_font(size: int, font: str | None = None) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at `size` px, or the TrueType `font` (a path or a name FreeType finds)."""
    if font is None:
        return ImageFont.load_default(size=size)
    try:
        return ImageFont.truetype(font, size)
    except OSError:
        raise FileNotFoundError(
            f"font {font!r} not found: pass a .ttf path, a system font name, or no font (Pillow's own)"
        ) from None


def _fit(draw: ImageDraw.ImageDraw, word: str, size: int, width: int, font: str | None):
    """The largest font <= size whose rendering of `word` fits `width` (at least 6 px)."""
    while True:
        f = load_font(size, font)
        box = draw.textbbox((0, 0), word, font=f)
        if box[2] - box[0] <= width or size <= 6:
            return f, box
        size = max(6, int(size * 0.85))


def draw_word(
    image: Image.Image, word: str, style: TextStyle | None = None, rng: random.Random | None = None
) -> Image.Image:
    """A copy of `image` with `word` written on it. `rng` places the word for position "random"."""
    style = style or TextStyle()
    img = image.convert("RGB").copy()
    W, H = img.size
    draw = ImageDraw.Draw(img)
    size = max(6, round(style.font_size * H if style.font_size < 1 else style.font_size))
    font, box = _fit(draw, word, size, int(0.92 * W), style.font)
    tw, th = box[2] - box[0], box[3] - box[1]
    pad = max(1, th // 5)
    x = (W - tw) // 2
    if style.position == "center":
        y = (H - th) // 2
    elif style.position == "top":
        y = pad + 1
    elif style.position == "bottom":
        y = H - th - 2 * pad - 1
    else:
        rng = rng or random.Random(0)
        x = rng.randint(pad, max(pad, W - tw - pad))
        y = rng.randint(pad, max(pad, H - th - pad))
    rect = (x - pad, y - pad, x + tw + pad, y + th + pad)
    if style.contrast == "box":
        draw.rectangle(rect, fill=(255, 255, 255))
        fill = (0, 0, 0)
    else:
        region = img.crop(tuple(max(0, v) for v in rect)).convert("L")
        hist = region.histogram()
        mean = sum(i * n for i, n in enumerate(hist)) / max(1, sum(hist))
        if style.contrast == "high":
            fill = (0, 0, 0) if mean > 127 else (255, 255, 255)
        else:
            v = int(mean + (45 if mean < 128 else -45))
            fill = (v, v, v)
    draw.text((x - box[0], y - box[1]), word, fill=fill, font=font)
    return img
