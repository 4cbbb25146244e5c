"""Image-caption pairs from disk: a manifest (CSV / TSV / JSONL) or a folder of images with sidecar captions.

Items are {"image": transform(PIL image), "text": tokenizer([caption])[0]} (raw PIL image / caption
string when no transform / tokenizer is given). An image may have several captions -- repeated manifest
rows, a JSON list, a `||`-separated field, or one caption per sidecar line -- and each access picks one
at random.

Bad data never crashes a run and is never dropped silently. Captions are checked when the source is
read (empty, non-text: dropped and counted); images when they are loaded (missing, corrupt). A
failed image is replaced by the next index (`retry=True`, keeps batches full) or returned as a
`Skipped` sentinel for `collate_pairs` to drop (`retry=False`); both count into `dataset.skips`. A
source with no usable pair is an error that names it.
"""

from __future__ import annotations

import csv
import functools
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from ..transforms import ImageLoadError, load_image
from .skips import SkipCounter, Skipped

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class PairRecord:
    """One image and all its captions."""

    image: Path
    captions: tuple[str, ...]


# ------------------------------------------------------------------------------------------ captions
def clean_captions(value: Any, sep: str | None, skips: SkipCounter, where: str) -> list[str]:
    """Usable captions in a manifest value (a string, possibly `sep`-separated, or a list of them);
    the rest is counted as empty_caption / non_text_caption."""
    items = value if isinstance(value, list | tuple) else [value]
    out = []
    for item in items:
        if not isinstance(item, str):
            skips.record("non_text_caption", f"{where}: {type(item).__name__} {str(item)[:40]!r}")
            continue
        parts = item.split(sep) if sep else [item]
        texts = [" ".join(part.split()) for part in parts]  # collapse whitespace, incl. newlines
        texts = [t for t in texts if t]  # "a||" is one caption with a stray separator
        if not texts:
            skips.record("empty_caption", where)
        out.extend(texts)
    return out


def _pick(captions: Sequence[str], seed: int | None, epoch: int, index: int) -> str:
    if len(captions) == 1:
        return captions[0]
    if seed is None:  # torch's global RNG: seeded per sample by the trainer, per worker by DataLoader
        return captions[int(torch.randint(len(captions), ()))]
    return captions[random.Random(f"{seed}/{epoch}/{index}").randrange(len(captions))]


def encode_text(tokenizer: Callable | None, caption: str, context_length: int | None) -> Any:
    """tokenizer([caption], context_length)[0] (truncated to fit), or the caption when there is none."""
    if tokenizer is None:
        return caption
    kwargs = {"context_length": context_length} if context_length is not None else {}
    try:
        return tokenizer([caption], truncate=True, **kwargs)[0]
    except TypeError:  # a tokenizer without `truncate`
        return tokenizer([caption], **kwargs)[0]


# ------------------------------------------------------------------------------------------ sources
def _resolve(value: str, root: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


def manifest_format(path: Path, fmt: str | None = None) -> str:
    """csv | tsv | jsonl from the suffix (or `fmt`); an error naming the file otherwise."""
    fmt = fmt or MANIFEST_FORMATS.get(path.suffix.lower())
    if fmt not in ("csv", "tsv", "jsonl"):
        raise ValueError(
            f"cannot tell the manifest format of {path}: use a suffix in {sorted(MANIFEST_FORMATS)} "
            "or pass fmt='csv' | 'tsv' | 'jsonl'"
        )
    return fmt


def _not_utf8(text: str) -> bool:
    """Whether text read with errors="surrogateescape" held bytes that are not UTF-8."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def manifest_rows(
    path: str | Path, fmt: str | None = None, skips: SkipCounter | None = None, strict: bool = False
) -> Iterable[tuple[int, dict]]:
    """(line number, row dict) of a CSV/TSV/JSONL manifest: the one manifest reader of training,
    evaluation and caching. Malformed JSONL lines and rows that are not UTF-8 are counted as bad_row in
    `skips` (training goes on without them); with `strict` (evaluation, where a dropped row changes the
    numbers) a row that is not UTF-8 is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    fmt = manifest_format(path, fmt)
    skips = skips if skips is not None else SkipCounter(str(path))

    def undecodable(n: int, text: str) -> bool:
        if not _not_utf8(text):
            return False
        if strict:
            raise ValueError(f"{path}:{n}: not UTF-8 text; re-save the manifest as UTF-8")
        skips.record("bad_row", f"{path.name}:{n}: not UTF-8")
        return True

    # surrogateescape: a stray Latin-1 byte costs its row, not the whole file (a UnicodeDecodeError)
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        if fmt in ("csv", "tsv"):
            reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
            if reader.fieldnames is None:
                return
            if _not_utf8("".join(k for k in reader.fieldnames if k)):
                raise ValueError(f"{path}:1: the header is not UTF-8 text; re-save the manifest as UTF-8")
            for n, row in enumerate(reader, start=2):
                text = "".join(v if isinstance(v, str) else "".join(map(str, v or ())) for v in row.values())
                if undecodable(n, text):
                    continue
                yield n, row
            return
        for n, line in enumerate(f, start=1):
            if not line.strip() or undecodable(n, line):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                skips.record("bad_row", f"{path.name}:{n}: {e.msg}")
                continue
            if not isinstance(row, dict):
                skips.record("bad_row", f"{path.name}:{n}: not a JSON object")
                continue
            yield n, row


def read_manifest(
    path: str | Path,
    image_key: str = "image",
    caption_key: str = "caption",
    *,
    sep: str | None = "||",
    root: str | Path | None = None,
    fmt: str | None = None,
    skips: SkipCounter | None = None,
    strict: bool = False,
) -> list[PairRecord]:
    """Records of a CSV/TSV/JSONL manifest (format from the suffix unless `fmt` is given). Repeated rows
    of one image merge their captions; relative paths are resolved against `root` (default: the
    manifest's folder). `strict`: see `manifest_rows`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    fmt = manifest_format(path, fmt)
    skips = skips if skips is not None else SkipCounter(str(path))
    base = Path(root) if root is not None else path.parent
    if not base.is_dir():  # else every image is "missing" and the run stops on consecutive failures
        raise FileNotFoundError(f"{path}: root folder of its image paths not found: {base}")
    merged: dict[Path, list[str]] = {}
    keys_seen: set[str] = set()
    for n, row in manifest_rows(path, fmt, skips, strict):
        keys_seen.update(k for k in row if k is not None)
        if image_key not in row or caption_key not in row:
            if fmt != "jsonl":  # a CSV header without the columns: a configuration error
                break
            skips.record("bad_row", f"{path.name}:{n}: no {image_key!r} / {caption_key!r} key")
            continue
        image = row[image_key]
        if not isinstance(image, str) or not image.strip():
            skips.record("no_image", f"{path.name}:{n}")
            continue
        value = row[caption_key]
        if value is None and fmt != "jsonl":  # a short CSV row
            value = ""
        captions = clean_captions(value, sep, skips, f"{path.name}:{n}")
        if captions:
            merged.setdefault(_resolve(image.strip(), base), []).extend(captions)
    missing = [k for k in (image_key, caption_key) if k not in keys_seen]
    if missing and keys_seen:
        raise ValueError(
            f"{path}: no column {' / '.join(map(repr, missing))}; found {sorted(keys_seen)} "
            "(set the image/caption column names)"
        )
    return [PairRecord(p, tuple(c)) for p, c in merged.items()]


def read_folder(
    root: str | Path, *, caption_ext: str = ".txt", recursive: bool = True, skips: SkipCounter | None = None
) -> list[PairRecord]:
    """Images under `root` (sorted), each with a sidecar caption file (`a.jpg` -> `a.txt`), one per line."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    skips = skips if skips is not None else SkipCounter(str(root))
    files = sorted(root.rglob("*") if recursive else root.iterdir())
    records = []
    for p in files:
        if p.suffix.lower() not in IMAGE_EXTS or not p.is_file():
            continue
        side = p.with_suffix(caption_ext)
        if not side.is_file():
            skips.record("no_caption", str(side.relative_to(root)))
            continue
        try:
            text = side.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            skips.record("non_text_caption", f"{side.relative_to(root)}: not UTF-8 text")
            continue
        captions = [" ".join(line.split()) for line in text.splitlines()]
        captions = [c for c in captions if c]
        if not captions:
            skips.record("empty_caption", f"caption file empty: {side.relative_to(root)}")
            continue
        records.append(PairRecord(p, tuple(captions)))
    return records


# ------------------------------------------------------------------------------------------ datasets
class UnreadableDataError(RuntimeError):
    """Every sample tried in a row failed to load: the source's images (or their root) are unreadable.

    A RuntimeError, as before it had a class of its own. A DataLoader worker's exception reaches the
    main process as this class again, its message wrapped in torch's "Caught ... in DataLoader worker
    process N. Original Traceback ..."; `reason` is the one-line message either way.
    """

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        # torch's wrapper ends with the worker's traceback, whose last line is "<module>.<Class>: <message>"
        marker = f"{type(self).__name__}: "
        last = msg.rstrip().splitlines()[-1] if msg.strip() else msg
        self.reason = last.split(marker, 1)[1] if "Original Traceback" in msg and marker in last else msg


def collate_pairs(batch: Sequence[Any], skips: SkipCounter | None = None) -> dict[str, Any] | None:
    """Stack a list of items into a batch, dropping `Skipped` sentinels (counted into `skips`).
    Returns None when every item was skipped."""
    good = []
    for item in batch:
        if isinstance(item, Skipped):
            if skips is not None:
                skips.record(item.reason, item.detail)
        else:
            good.append(item)
    return default_collate(good) if good else None


class PairDataset(Dataset):
    """Map-style dataset over PairRecords; see the module docstring for skipping.

    With `retry`, a failed index is counted and replaced by the next loadable one; over an epoch (every
    index once) each bad file is counted exactly once.

    `seed=None` draws caption choices from torch's global RNG (which the trainer seeds per sample);
    an int makes them a function of (seed, epoch, index) -- call `set_epoch` each epoch.
    """

    def __init__(
        self,
        records: Sequence[PairRecord],
        *,
        source: str,
        transform: Callable | None = None,
        tokenizer: Callable | None = None,
        context_length: int | None = None,
        retry: bool = True,
        max_retries: int = 64,
        seed: int | None = None,
        skips: SkipCounter | None = None,
    ) -> None:
        self.source = source
        self.skips = skips if skips is not None else SkipCounter(source)
        if not records:
            raise ValueError(f"no usable image-caption pairs in {source} ({self.skips.summary()})")
        self.records = list(records)
        self.transform, self.tokenizer, self.context_length = transform, tokenizer, context_length
        self.retry, self.max_retries, self.seed, self.epoch = retry, max_retries, seed, 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def collate_fn(self) -> Callable:
        """`collate_pairs` bound to this dataset's counter (pass it to the DataLoader)."""
        return functools.partial(collate_pairs, skips=self.skips)

    def captions(self) -> list[str]:
        """Every caption (e.g. to train a BPE vocabulary)."""
        return [c for r in self.records for c in r.captions]

    def load(self, index: int) -> tuple[Any, str] | Skipped:
        """(RGB PIL image, caption) of record `index`, or Skipped naming why not."""
        rec = self.records[index]
        try:
            image = load_image(rec.image)
        except FileNotFoundError:
            return Skipped("missing_image", str(rec.image))
        except (ImageLoadError, OSError, ValueError) as e:
            return Skipped("corrupt_image", f"{rec.image}: {str(e)[:120]}")
        return image, _pick(rec.captions, self.seed, self.epoch, index)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        n = len(self.records)
        failed: dict[str, list[str]] = {}  # reason -> details of the distinct records tried
        for attempt in range(self.max_retries + 1):
            j = (index + attempt) % n
            got = self.load(j)
            if not isinstance(got, Skipped):
                image, caption = got
                image = self.transform(image) if self.transform is not None else image
                return {"image": image, "text": encode_text(self.tokenizer, caption, self.context_length)}
            if not self.retry:
                return got
            if attempt == 0:  # a bad neighbour tried as a replacement is counted when its own index comes up,
                self.skips.record(got.reason, got.detail)  # so each bad file counts once per epoch
            if attempt < n:
                failed.setdefault(got.reason, []).append(got.detail)
        tried = min(self.max_retries + 1, n)
        what = f"all {n} images" if tried == n else f"{tried} consecutive images from index {index}"
        counts = ", ".join(f"{r} {len(d)}" + (f" (e.g. {d[0]})" if d[0] else "") for r, d in failed.items())
        raise UnreadableDataError(f"{what} of {self.source} failed to load: {counts}; is the data readable?")


class ManifestPairs(PairDataset):
    """Pairs from a CSV / TSV / JSONL manifest; see `read_manifest` for the options."""

    def __init__(
        self,
        path: str | Path,
        *,
        image_key: str = "image",
        caption_key: str = "caption",
        sep: str | None = "||",
        root: str | Path | None = None,
        fmt: str | None = None,
        **kwargs: Any,
    ) -> None:
        skips = kwargs.pop("skips", None) or SkipCounter(str(path))
        records = read_manifest(path, image_key, caption_key, sep=sep, root=root, fmt=fmt, skips=skips)
        super().__init__(records, source=str(path), skips=skips, **kwargs)


class FolderPairs(PairDataset):
    """Pairs from a folder of images with sidecar caption files; see `read_folder`."""

    def __init__(
        self, root: str | Path, *, caption_ext: str = ".txt", recursive: bool = True, **kwargs: Any
    ) -> None:
        skips = kwargs.pop("skips", None) or SkipCounter(str(root))
        records = read_folder(root, caption_ext=caption_ext, recursive=recursive, skips=skips)
        super().__init__(records, source=str(root), skips=skips, **kwargs)


def open_pairs(path: str | Path, **kwargs: Any) -> PairDataset:
    """A folder -> FolderPairs, a file -> ManifestPairs (folder-only / manifest-only kwargs must fit)."""
    return FolderPairs(path, **kwargs) if Path(path).is_dir() else ManifestPairs(path, **kwargs)
