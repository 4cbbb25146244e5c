"""Evaluation datasets from disk: image folders, labelled manifests, retrieval sets (manifest or tar shards).

Classification items are {"image": FloatTensor (3, S, S), "label": int}; retrieval sets expose the
images as a Dataset plus a flat caption list and `text_to_image` (the image index of every caption).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..data.pairs import IMAGE_EXTS, manifest_rows, read_folder, read_manifest
from ..data.skips import SkipCounter, Skipped
from ..data.wds import image_member, sample_captions, shard_samples, shard_urls
from ..transforms import ImageLoadError, load_image
from .templates import read_list_file

_load_image = load_image


def _read_classnames(spec, folders: Sequence[str]) -> list[str]:
    """Class names from a list, a file (a JSON list in folder order or {folder: name} map, or a text file
    with one name a line). Empty names are refused; duplicates are allowed (ImageNet has two 'crane's)
    but said, since zero-shot cannot tell such classes apart."""
    if spec is None:
        return [f.replace("_", " ") for f in folders]
    data = read_list_file(spec, "class name") if isinstance(spec, str | Path) else spec
    if isinstance(data, dict):
        absent = [f for f in folders if f not in data]
        if absent:
            raise ValueError(f"{spec}: no class name for {', '.join(map(repr, absent[:5]))}")
        names = [data[f] for f in folders]
    else:
        names = list(data)
    if len(names) != len(folders):
        raise ValueError(f"{spec}: {len(names)} class names for {len(folders)} class folders")
    empty = [i for i, n in enumerate(names) if not isinstance(n, str) or not n.strip()]
    if empty:
        raise ValueError(f"{spec}: class {empty[0]} ({folders[empty[0]]!r}) has no name: {names[empty[0]]!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        shown = ", ".join(map(repr, dup[:5]))
        warnings.warn(
            f"{spec}: duplicate class names {shown} (zero-shot cannot tell them apart)", stacklevel=3
        )
    return names


class _LabelledImages(Dataset):
    """Items {"image", "label", "valid"}. An image that cannot be read is counted in `skips` (by reason,
    naming the file) and comes back as a blank image with valid=False: the feature encoder drops it
    together with its label, so one bad file never stops an evaluation and labels stay aligned."""

    samples: list[tuple[Path, int]]
    transform: Callable
    skips: SkipCounter
    class_keys: list[str]  # what label i stands for on disk (folder name, label string or id): sets compare

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        path, label = self.samples[i]
        try:
            return {"image": self.transform(_load_image(path)), "label": label, "valid": True}
        except FileNotFoundError:
            self.skips.record("missing_image", str(path))
        except (ImageLoadError, OSError, ValueError) as e:
            self.skips.record("corrupt_image", str(e)[:160])
        blank = self.transform(Image.new("RGB", (8, 8)))  # the shape a good item has
        return {"image": blank, "label": label, "valid": False}


class ImageFolderDataset(_LabelledImages):
    """root/<class>/<image>: one folder per class, classes in sorted folder order."""

    def __init__(self, root: str | Path, transform: Callable, classnames=None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.folders = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.folders:
            raise ValueError(f"no class folders in {self.root}")
        self.classnames = _read_classnames(classnames, self.folders)
        self.class_keys = list(self.folders)
        self.samples = [
            (p, i)
            for i, f in enumerate(self.folders)
            for p in sorted((self.root / f).iterdir())
            if p.suffix.lower() in IMAGE_EXTS
        ]
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) under {self.root}")
        self.transform, self.skips = transform, SkipCounter(str(self.root))


def _read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl / .csv / .tsv manifest as dicts (the shared manifest reader)."""
    rows = [row for _, row in manifest_rows(path, strict=True)]
    if not rows:
        raise ValueError(f"manifest is empty: {path}")
    return rows


class ManifestClassificationDataset(_LabelledImages):
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
            self.class_keys = [str(i) for i in range(max(ids) + 1)]
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
            self.class_keys = sorted(set(labels))
            index = {n: i for i, n in enumerate(self.class_keys)}
            ids = [index[v] for v in labels]
        self.transform, self.skips = transform, SkipCounter(str(path))
        self.samples = []
        for r, y in zip(rows, ids):
            image = r[image_key]
            if not isinstance(image, str) or not image.strip():  # a row without an image path
                self.skips.record("no_image", f"{path.name}: label {r[label_key]!r}")
                continue
            self.samples.append((path.parent / image.strip(), y))
        if not self.samples:
            raise ValueError(f"{path}: no rows with an image path ({self.skips.summary()})")


class _ImageList(Dataset):
    """Images from paths or (bytes, name) pairs (shard members: errors name shard and member)."""

    def __init__(self, sources: list, transform: Callable) -> None:
        self.sources, self.transform = sources, transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.transform(_open(self.sources[i]))}


def _open(src):
    if isinstance(src, tuple):  # (bytes, "shard.tar:key.jpg")
        return _load_image(io.BytesIO(src[0]), name=src[1])
    return _load_image(src)


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
        cls, manifest: str | Path, transform: Callable, image_key="image", caption_key="caption", **kwargs
    ) -> RetrievalSet:
        """Rows with an image path and a caption (a string, or a list of strings in .jsonl); rows naming
        the same image add captions to it (the shared manifest reader: `data.pairs.read_manifest`)."""
        records = read_manifest(manifest, image_key, caption_key, strict=True, **kwargs)
        if not records:
            raise ValueError(f"{manifest}: no image-caption rows")
        return cls(_ImageList([r.image for r in records], transform), [list(r.captions) for r in records])

    @classmethod
    def from_tars(
        cls,
        shards: Sequence[str | Path],
        transform: Callable,
        skips: SkipCounter | None = None,
        echo: Callable[[str], None] = tqdm.write,
    ) -> RetrievalSet:
        """WebDataset tar shards: <key>.<jpg|png|...> with <key>.txt (one caption per line) or <key>.json
        (a list of captions, or {"captions": [...]} / {"caption": str}); samples grouped by webdataset's
        key rule. Samples without an image or a caption, undecodable images and what cut shards lost are
        dropped, counted by reason and reported once through `echo`."""
        urls = [str(s) for s in shards]
        skips = skips if skips is not None else SkipCounter(", ".join(urls) if len(urls) < 3 else urls[0])
        imgs: list[tuple[bytes, str]] = []
        caps: list[list[str]] = []
        for sample in shard_samples(urls, skips):
            where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            ext = image_member(sample)
            if ext is None:
                skips.record("no_image", where)
                continue
            captions = sample_captions(sample)
            if isinstance(captions, Skipped):
                skips.record(captions.reason, captions.detail)
                continue
            try:  # decode once here, so one bad image never stops the feature pass
                load_image(io.BytesIO(sample[ext]), name=f"{where}.{ext}")
            except (ImageLoadError, OSError, ValueError) as e:
                skips.record("corrupt_image", str(e)[:160])
                continue
            imgs.append((sample[ext], f"{where}.{ext}"))
            caps.append(captions)
        if skips.total:
            echo(skips.summary())
        if not imgs:
            raise ValueError(f"no (image, caption) samples in {', '.join(urls)} ({skips.summary()})")
        return cls(_ImageList(imgs, transform), caps)


def _is_shards(path: str) -> bool:
    p = Path(path)
    return path.endswith(".tar") or "{" in path or (p.is_dir() and any(p.glob("*.tar")))


def open_labelled(
    path: str | Path, transform: Callable, classnames=None, image_key: str = "image", label_key: str = "label"
) -> ImageFolderDataset | ManifestClassificationDataset:
    """Labelled images: a folder of class folders, or a manifest with image and label columns."""
    p = Path(path)
    if p.is_dir():
        return ImageFolderDataset(p, transform, classnames)
    return ManifestClassificationDataset(p, transform, classnames, image_key, label_key)


def open_retrieval(
    path: str | Path,
    transform: Callable,
    image_key: str = "image",
    caption_key: str = "caption",
    sep: str | None = "||",
    root: str | Path | None = None,
    echo: Callable[[str], None] = tqdm.write,
) -> RetrievalSet:
    """Held-out pairs for retrieval: tar shards, a folder with sidecar captions or a manifest. Images that
    cannot be read are dropped once, here, counted by reason and reported through `echo`."""
    if _is_shards(str(path)):
        return RetrievalSet.from_tars(shard_urls(str(path)), transform, SkipCounter(str(path)), echo)
    skips = SkipCounter(str(path))
    if Path(path).is_dir():
        records = read_folder(path, skips=skips)
    else:
        records = read_manifest(path, image_key, caption_key, sep=sep, root=root, skips=skips, strict=True)
    good = []
    for r in records:
        try:
            load_image(r.image)
            good.append(r)
        except FileNotFoundError:
            skips.record("missing_image", str(r.image))
        except (ImageLoadError, OSError, ValueError) as e:
            skips.record("corrupt_image", f"{r.image}: {str(e)[:80]}")
    if skips.total:
        echo(f"{path}: {skips.summary()}")
    if not good:
        raise ValueError(f"{path}: no usable image-caption pairs ({skips.summary()})")
    return RetrievalSet(_ImageList([r.image for r in good], transform), [list(r.captions) for r in good])
