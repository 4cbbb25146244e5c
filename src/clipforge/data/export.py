"""Writing in-memory sets to disk: an image-caption folder (sidecar .txt) or a class-per-folder image set.

With these the synthetic data feeds every on-disk path: `clipforge shards`, `clipforge eval zeroshot /
robustness` (one folder per class, every class present, so zero-shot sees the full class list) and
supervised image-tower pretraining.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image


def _to_pil(image: Image.Image | torch.Tensor) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 (3, H, W) image, got {image.dtype} {tuple(image.shape)}")
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())


def write_pair_folder(
    pairs: Iterable[tuple[Image.Image | torch.Tensor, str | Sequence[str]]], out: str | Path, ext: str = "png"
) -> Path:
    """out/NNNNNN.<ext> with out/NNNNNN.txt (one caption per line) for each (image, caption(s)) pair."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, captions) in enumerate(pairs):
        _to_pil(image).save(out / f"{i:06d}.{ext}")
        lines = [captions] if isinstance(captions, str) else list(captions)
        (out / f"{i:06d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def class_folder_name(classname: str) -> str:
    """'purple triangle' -> 'purple_triangle' (folder readers map '_' back to ' ')."""
    return classname.replace(" ", "_").replace("/", "-")


def write_class_folders(
    images: torch.Tensor | Sequence[Image.Image],
    labels: Sequence[int] | torch.Tensor,
    classnames: Sequence[str],
    out: str | Path,
    ext: str = "png",
) -> Path:
    """out/<class>/NNNNNN.<ext>, a folder for every class (empty ones too, so the class list is whole)
    and out/classnames.json ({folder: class name})."""
    out = Path(out)
    labels = [int(y) for y in labels]
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    folders = [class_folder_name(c) for c in classnames]
    if len(set(folders)) != len(folders):
        raise ValueError("class names collide as folder names")
    for f in folders:
        (out / f).mkdir(parents=True, exist_ok=True)
    for i, (image, y) in enumerate(zip(images, labels, strict=True)):
        _to_pil(image).save(out / folders[y] / f"{i:06d}.{ext}")
    (out / "classnames.json").write_text(
        json.dumps(dict(zip(folders, classnames, strict=True)), indent=1) + "\n"
    )
    return out


def write_robustness_sets(
    cfg, out: str | Path, n_per_class: int = 10, split: str = "seen_eval", shifts: Sequence[str] | None = None
) -> dict[str, Path]:
    """The synthetic classification set under every distribution shift, one class-folder set each:
    out/<shift>/<class>/... ("none" is the in-distribution set). Returns {shift: folder}, ready for
    `clipforge eval robustness` (in-distribution = out/none, shifted = the others)."""
    from .synthetic import SHIFTS, classification_set

    paths = {}
    for shift in shifts or SHIFTS:
        images, labels, classnames = classification_set(cfg, n_per_class, split, shift=shift)
        paths[shift] = write_class_folders(images, labels, classnames, Path(out) / shift)
    return paths
