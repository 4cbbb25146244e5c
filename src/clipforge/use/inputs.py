"""What `embed`, `classify` and `score` read: items from an image folder, a manifest, WebDataset shards
or a captions file, and the datasets that decode them in DataLoader workers.

An item has a stable `key` (relative path, manifest path, `shard/key`, or caption line number): the
resume / append logic of `embed` uses it to tell what is already done. Captions are optional for images
(a folder's sidecar files, a manifest's caption column, a shard's txt/json member) and required for texts.
Unreadable images become `Skipped` entries (reason + name), never a crash: they are counted and logged.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info

from ..data.pairs import IMAGE_EXTS, MANIFEST_FORMATS, clean_captions, manifest_rows
from ..data.skips import SkipCounter, Skipped
from ..data.wds import image_member, iter_samples, sample_captions, shard_urls
from ..transforms import ImageLoadError, load_image, load_image_reduced

KINDS = ("folder", "manifest", "shards", "captions")


@dataclass(frozen=True)
class Item:
    key: str
    path: str | None = None  # an image file (folder / manifest items)
    caption: str | None = None


def detect_kind(data: str | Path) -> str:
    """folder | manifest | shards | captions, from what `data` is (an error naming it otherwise)."""
    s = str(data)
    p = Path(s)
    if "{" in s or s.endswith(".tar") or "::" in s:
        return "shards"
    if p.is_dir():
        has_images = any(f.suffix.lower() in IMAGE_EXTS for f in p.rglob("*"))
        if not has_images and any(p.glob("*.tar")):
            return "shards"
        return "folder"
    if not p.exists():
        raise FileNotFoundError(f"data not found: {s}")
    if p.suffix.lower() in MANIFEST_FORMATS:
        return "manifest"
    if p.suffix.lower() == ".txt":
        return "captions"
    raise ValueError(
        f"cannot tell what {s} is: pass an image folder, a manifest ({', '.join(sorted(MANIFEST_FORMATS))}), "
        "WebDataset shards (.tar, brace pattern, or a folder of .tar) or a captions .txt, or set the kind"
    )


def first_caption(value: Any, where: str, skips: SkipCounter) -> str | None:
    captions = clean_captions(value, "||", skips, where) if value is not None else []
    return captions[0] if captions else None


def folder_items(root: str | Path, caption_ext: str = ".txt") -> list[Item]:
    """Images under `root` (recursive, sorted), each with its sidecar caption's first line if it has one."""
    root = Path(root)
    items = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTS or not p.is_file():
            continue
        caption = None
        side = p.with_suffix(caption_ext)
        if side.is_file():
            try:
                lines = [" ".join(x.split()) for x in side.read_bytes().decode("utf-8-sig").splitlines()]
                caption = next((x for x in lines if x), None)
            except UnicodeDecodeError:
                caption = None
        items.append(Item(p.relative_to(root).as_posix(), str(p), caption))
    return items


def manifest_items(
    path: str | Path,
    image_key: str = "image",
    caption_key: str = "caption",
    skips: SkipCounter | None = None,
    need_image: bool = True,
) -> list[Item]:
    """Rows of a CSV/TSV/JSONL manifest; image paths relative to its folder. Text-only rows (no image
    column, `need_image=False`) are keyed by line number."""
    path = Path(path)
    skips = skips if skips is not None else SkipCounter(str(path))
    items, seen = [], set()
    for n, row in manifest_rows(path, skips=skips):
        image = row.get(image_key)
        caption = first_caption(row.get(caption_key), f"{path.name}:{n}", skips)
        if not need_image:
            if caption is not None:
                items.append(Item(f"line:{n}", None, caption))
            continue
        if not isinstance(image, str) or not image.strip():
            if image_key not in row:
                raise ValueError(f"{path}: no column {image_key!r}; found {sorted(k for k in row if k)}")
            skips.record("no_image", f"{path.name}:{n}")
            continue
        image = image.strip()
        if image in seen:  # a repeated row of one image (several captions): embedded once
            continue
        seen.add(image)
        p = Path(image).expanduser()
        items.append(Item(image, str(p if p.is_absolute() else path.parent / p), caption))
    return items


def caption_items(path: str | Path) -> list[Item]:
    """One caption per non-empty line, keyed by its line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    items = [Item(f"line:{i}", None, " ".join(t.split())) for i, t in enumerate(lines, 1) if t.strip()]
    if not items:
        raise ValueError(f"caption file empty: {path}")
    return items


def open_image(source: Any, name: str, draft_side: int | None = None) -> Any:
    """(PIL image, its full upright (width, height)), or Skipped naming why not (missing / corrupt;
    load_image's size guards apply). `draft_side`: decode JPEGs at reduced scale down to that short side
    (`load_image_reduced`, the opt-in fast path; other pixels than the exact path's)."""
    try:
        if draft_side is not None:
            return load_image_reduced(source, draft_side)
        image = load_image(source)
        return image, image.size
    except FileNotFoundError:
        return Skipped("missing_image", name)
    except (ImageLoadError, OSError, ValueError) as e:
        return Skipped("corrupt_image", f"{name}: {str(e)[:160]}")


def _row(
    item: Item, opened: tuple[Any, tuple[int, int]] | None, transform: Callable | None
) -> dict[str, Any]:
    row: dict[str, Any] = {"key": item.key, "path": item.path, "caption": item.caption}
    if opened is not None:
        image, (row["width"], row["height"]) = opened
        row["pixels"] = transform(image) if transform is not None else image
    return row


class ItemImages(Dataset):
    """Map-style: item i -> {"key", "path", "caption", "width", "height", "pixels"} or (key, Skipped).
    With `images=False` no file is opened (text-only embedding); `draft_side`: see `open_image`."""

    def __init__(
        self,
        items: Sequence[Item],
        transform: Callable | None,
        images: bool = True,
        draft_side: int | None = None,
    ) -> None:
        self.items, self.transform, self.images = list(items), transform, images
        self.draft_side = draft_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any] | tuple[str, Skipped]:
        item = self.items[i]
        if not self.images:
            return _row(item, None, None)
        image = open_image(item.path, item.key, self.draft_side)
        if isinstance(image, Skipped):
            return item.key, image
        return _row(item, image, self.transform)


class ShardImages(IterableDataset):
    """Samples of WebDataset shards in shard order (shards split over DataLoader workers), keyed
    `<shard file name>/<sample key>`; keys in `done` are passed over before any decoding."""

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: Callable | None,
        done: set[str],
        images: bool = True,
        draft_side: int | None = None,
    ) -> None:
        self.urls = shard_urls(urls)
        self.transform, self.done, self.images = transform, done, images
        self.draft_side = draft_side

    def __iter__(self) -> Iterator[dict[str, Any] | tuple[str, Skipped]]:
        info = get_worker_info()
        urls = self.urls if info is None else self.urls[info.id :: info.num_workers]
        errors: list[Exception] = []

        def handler(e: Exception) -> bool:  # an unreadable shard: reported, the rest goes on
            errors.append(e)
            return True

        for sample in iter_samples(urls, handler):
            while errors:
                yield "", Skipped("corrupt_shard", str(errors.pop())[:160])
            key = f"{Path(sample.get('__url__', '?')).name}/{sample['__key__']}"
            if key in self.done:
                continue
            captions = sample_captions(sample)
            caption = captions[0] if isinstance(captions, list) else None
            item = Item(key, None, caption)
            if not self.images:
                yield _row(item, None, None)
                continue
            ext = image_member(sample)
            if ext is None:
                yield key, Skipped("no_image", key)
                continue
            image = open_image(io.BytesIO(sample[ext]), f"{key}.{ext}", self.draft_side)
            yield (key, image) if isinstance(image, Skipped) else _row(item, image, self.transform)
        while errors:
            yield "", Skipped("corrupt_shard", str(errors.pop())[:160])


def collate_rows(batch: Sequence[Any]) -> dict[str, Any]:
    """Good rows stacked (pixels as one tensor, other fields as lists) and the skipped (key, Skipped)."""
    good = [b for b in batch if isinstance(b, dict)]
    out: dict[str, Any] = {"skipped": [b for b in batch if not isinstance(b, dict)]}
    for field in ("key", "path", "caption", "width", "height"):
        out[field] = [b.get(field) for b in good]
    # default_collate stacks straight into shared memory inside a DataLoader worker; a plain torch.stack
    # would be copied there once more when the batch is sent to the main process.
    out["pixels"] = default_collate([b["pixels"] for b in good]) if good and "pixels" in good[0] else None
    return out
