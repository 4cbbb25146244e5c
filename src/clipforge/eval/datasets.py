"""Evaluation datasets from disk: image folders, labelled manifests, retrieval sets (manifest or tar shards).

Classification items are {"image": FloatTensor (3, S, S), "label": int}; retrieval sets expose the
images as a Dataset plus a flat caption list and `text_to_image` (the image index of every caption).
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _load_image(src) -> Image.Image:
    try:  # the shared loader (clear errors, decompression-bomb guard) once it exists
        from ..transforms import load_image
    except ImportError:
        with Image.open(src) as im:
            return im.convert("RGB")
    return load_image(src)


def _read_classnames(spec, folders: Sequence[str]) -> list[str]:
    """Class names from a list, a JSON list (in folder order) or a JSON {folder: name} map."""
    if spec is None:
        return [f.replace("_", " ") for f in folders]
    data = json.loads(Path(spec).read_text(encoding="utf-8")) if isinstance(spec, str | Path) else spec
    names = [data[f] for f in folders] if isinstance(data, dict) else list(data)
    if len(names) != len(folders):
        raise ValueError(f"{spec}: {len(names)} class names for {len(folders)} class folders")
    return names


class ImageFolderDataset(Dataset):
    """root/<class>/<image>: one folder per class, classes in sorted folder order."""

    def __init__(self, root: str | Path, transform: Callable, classnames=None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.folders = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.folders:
            raise ValueError(f"no class folders in {self.root}")
        self.classnames = _read_classnames(classnames, self.folders)
        self.samples = [
            (p, i)
            for i, f in enumerate(self.folders)
            for p in sorted((self.root / f).iterdir())
            if p.suffix.lower() in IMAGE_EXTS
        ]
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) under {self.root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        path, label = self.samples[i]
        return {"image": self.transform(_load_image(path)), "label": label}


def _read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl / .csv / .tsv manifest as dicts."""
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    if not rows:
        raise ValueError(f"manifest is empty: {path}")
    return rows


class ManifestClassificationDataset(Dataset):
    """A manifest with columns `image` (path, relative to the manifest) and `label` (int or class name)."""

    def __init__(
        self, manifest: str | Path, transform: Callable, classnames=None, image_key="image", label_key="label"
    ) -> None:
        path = Path(manifest)
        rows = _read_rows(path)
        for key in (image_key, label_key):
            if key not in rows[0]:
                raise KeyError(f"{path}: no column {key!r} (columns: {', '.join(rows[0])})")
        labels = [r[label_key] for r in rows]
        if all(str(v).lstrip("-").isdigit() for v in labels):
            ids = [int(v) for v in labels]
            self.classnames = (
                _read_classnames(classnames, [str(i) for i in range(max(ids) + 1)])
                if classnames is not None
                else [str(i) for i in range(max(ids) + 1)]
            )
        else:
            names = (
                sorted(set(labels))
                if classnames is None
                else _read_classnames(classnames, sorted(set(labels)))
            )
            self.classnames = names if classnames is not None else [n.replace("_", " ") for n in names]
            index = {n: i for i, n in enumerate(sorted(set(labels)))}
            ids = [index[v] for v in labels]
        self.samples = [(path.parent / r[image_key], y) for r, y in zip(rows, ids)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        p, y = self.samples[i]
        return {"image": self.transform(_load_image(p)), "label": y}


class _ImageList(Dataset):
    def __init__(self, sources: list, transform: Callable) -> None:
        self.sources, self.transform = sources, transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict:
        src = self.sources[i]
        return {"image": self.transform(_load_image(io.BytesIO(src) if isinstance(src, bytes) else src))}


class RetrievalSet:
    """images (a Dataset in image order), captions (flat list), text_to_image (LongTensor)."""

    def __init__(self, images: Dataset, captions_per_image: Sequence[Sequence[str]]) -> None:
        self.images = images
        self.captions = [c for caps in captions_per_image for c in caps]
        self.text_to_image = torch.tensor(
            [i for i, caps in enumerate(captions_per_image) for _ in caps], dtype=torch.long
        )

    @classmethod
    def from_manifest(
        cls, manifest: str | Path, transform: Callable, image_key="image", caption_key="caption"
    ) -> RetrievalSet:
        """Rows with an image path and a caption (a string, or a list of strings in .jsonl); rows naming
        the same image add captions to it."""
        path = Path(manifest)
        rows = _read_rows(path)
        order: dict[str, list[str]] = {}
        for r in rows:
            if image_key not in r or caption_key not in r:
                raise KeyError(f"{path}: rows need {image_key!r} and {caption_key!r} (got {', '.join(r)})")
            caps = r[caption_key] if isinstance(r[caption_key], list) else [r[caption_key]]
            order.setdefault(r[image_key], []).extend(str(c) for c in caps)
        images = _ImageList([path.parent / k for k in order], transform)
        return cls(images, list(order.values()))

    @classmethod
    def from_tars(cls, shards: Sequence[str | Path], transform: Callable) -> RetrievalSet:
        """WebDataset-style tar shards: <key>.<jpg|png|...> with <key>.txt (one caption per line) or
        <key>.json (a list of captions, or {"captions": [...]} / {"caption": str})."""
        imgs: dict[str, bytes] = {}
        caps: dict[str, list[str]] = {}
        for shard in shards:
            with tarfile.open(shard) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.partition(".")
                    data = tar.extractfile(m).read()
                    if "." + ext.lower() in IMAGE_EXTS:
                        imgs[f"{shard}/{key}"] = data
                    elif ext == "txt":
                        lines = data.decode("utf-8").splitlines()
                        caps[f"{shard}/{key}"] = [x.strip() for x in lines if x.strip()]
                    elif ext == "json":
                        j = json.loads(data)
                        j = j if isinstance(j, list) else j.get("captions", [j.get("caption", "")])
                        caps[f"{shard}/{key}"] = [str(x) for x in j if str(x).strip()]
        keys = [k for k in imgs if caps.get(k)]
        if not keys:
            raise ValueError(f"no (image, caption) samples in {', '.join(map(str, shards))}")
        return cls(_ImageList([imgs[k] for k in keys], transform), [caps[k] for k in keys])
