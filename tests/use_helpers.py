"""Shared helpers for the use/ tests: a tiny checkpoint directory and a folder of small images."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipforge import Tokenizer, create_model, save_pretrained

WORDS = ["red", "green", "blue", "yellow", "purple", "orange"]


def tiny_checkpoint(directory: Path, preset: str = "tiny-vit", seed: int = 0) -> Path:
    """A clipforge checkpoint directory (random weights, OpenAI's tokenizer files)."""
    torch.manual_seed(seed)
    model = create_model(preset).eval()
    tok = Tokenizer.from_openai_vocab(context_length=model.config.text.context_length)
    return save_pretrained(model, directory, tokenizer=tok)


def write_images(folder: Path, n: int, *, size=(40, 48), captions: bool = True, seed: int = 0) -> list[Path]:
    """n noisy colour images (PNG and JPEG alternating) in folder/ and folder/sub/, sidecar captions."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        d = folder / ("sub" if i % 3 == 2 else "")
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, 3)
        arr = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        p = d / f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(p)
        if captions:
            p.with_suffix(".txt").write_text(f"a {WORDS[i % len(WORDS)]} picture number {i}\n")
        paths.append(p)
    return paths


def write_corrupt(folder: Path, name: str = "broken.jpg") -> Path:
    p = folder / name
    p.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    p.with_suffix(".txt").write_text("a broken picture\n")
    return p
