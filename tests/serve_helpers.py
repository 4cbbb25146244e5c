"""Shared set-up of the serve tests: a tiny checkpoint, a folder of distinct images embedded and indexed
with the use/ library, and the Service over them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.serve.config import ServeConfig
from clipforge.serve.server import build_service
from clipforge.use import EmbedOptions, embed
from clipforge.use.index import build_index
from use_helpers import tiny_checkpoint, write_images

N_IMAGES = 12


def build_index_dir(root: Path) -> tuple[Path, Path, list[Path]]:
    """(checkpoint dir, indexed embedding dir, image files) under root."""
    ckpt = tiny_checkpoint(root / "ckpt")
    images = write_images(root / "photos", N_IMAGES)
    emb = root / "emb"
    embed(root / "photos", emb, ckpt, options=EmbedOptions(batch_size=8, progress=False, dtype="float32"))
    build_index(emb)
    return ckpt, emb, images


def make_service(ckpt: Path, emb: Path | None, **config) -> object:
    return build_service(ckpt, emb, config=ServeConfig(**config))


def png_bytes(size=(32, 32), colour=(200, 30, 30), fmt="PNG") -> bytes:
    rng = np.random.default_rng(sum(colour))
    arr = np.clip(np.array(colour) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(side: int = 20_000) -> bytes:
    """A PNG of side x side black pixels: a few hundred KB that would decode to side^2 * 3 bytes."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
