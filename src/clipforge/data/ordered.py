"""Every sample of a source in one fixed order, and fingerprints of the files behind it.

The embedding-cache writer reads a source start to end (no shuffle, no rank or worker split) and must be
able to resume in the middle: positions count every sample the source lists, readable or not, so
`samples(start)` continues exactly where an interrupted run stopped. Positions before `start` are passed
over without decoding an image.

A fingerprint says what a source is by content (kind; sizes, mtimes and relative paths of its files or a
hash of the manifest; the samples it lists and their captions where that needs no image decoding), so a
cache can refuse other data and say what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .pairs import PairDataset
from .skips import Skipped
from .wds import decode_sample, iter_samples

# fingerprint keys compared when a cache meets its data; "path" is informative only (a moved data set
# with the same files is the same data)
COMPARED = ("kind", "files", "samples", "captions")


@dataclass(frozen=True)
class Sample:
    """One readable sample: a PIL image (files, shards) or a uint8 tensor (3, S, S) (synthetic), all its
    captions, and a name for logs (the file, or shard:key)."""

    image: Any
    captions: tuple[str, ...]
    name: str


# ------------------------------------------------------------------------------------------ iteration
def pair_samples(pairs: PairDataset, start: int = 0) -> Iterator[Sample | Skipped]:
    """Records of a manifest / folder in listing order; unreadable images as Skipped (never a neighbour)."""
    for i in range(start, len(pairs.records)):
        got = pairs.load(i)  # the loader training uses: same decoding limits, same skip reasons
        if isinstance(got, Skipped):
            yield got
        else:
            yield Sample(got[0], pairs.records[i].captions, str(pairs.records[i].image))


def shard_samples(
    urls: Sequence[str], caption_key: str = "caption", start: int = 0
) -> Iterator[Sample | Skipped]:
    """Samples of the shards in the given order; an unreadable shard (or the cut end of one) is one Skipped
    position, a bad sample another. Positions before `start` are read as raw bytes, not decoded."""
    broken: list[Skipped] = []

    def handler(exn: Exception) -> bool:
        broken.append(Skipped("corrupt_shard", f"{type(exn).__name__}: {str(exn)[:160]}"))
        return True  # go on with the next shard

    pos = 0
    for raw in iter_samples(list(urls), handler):
        while broken:
            item = broken.pop(0)
            if pos >= start:
                yield item
            pos += 1
        if pos >= start:
            got = decode_sample(raw, caption_key)
            name = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
            yield got if isinstance(got, Skipped) else Sample(got[0], tuple(got[1]), name)
        pos += 1
    for item in broken:
        if pos >= start:
            yield item
        pos += 1


# ------------------------------------------------------------------------------------------ fingerprints
def _sha(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


def captions_digest(rows: Iterable[Sequence[str]]) -> str:
    """sha256 of captions in order (each sample's list as one JSON line)."""
    return _sha(json.dumps(list(r), ensure_ascii=False) for r in rows)


def files_digest(paths: Iterable[Path], base: Path) -> str:
    """sha256 over (path relative to `base`, size, mtime) of each file, in the given order."""

    def entry(p: Path) -> str:
        rel = os.path.relpath(p, base)
        try:
            st = p.stat()
        except OSError:
            return f"{rel}|missing"
        return f"{rel}|{st.st_size}|{st.st_mtime_ns}"

    return _sha(entry(Path(p)) for p in paths)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pairs_fingerprint(kind: str, pairs: PairDataset, path: Path, base: Path) -> dict[str, Any]:
    """A manifest (its bytes hashed) or folder, plus each listed image's size and mtime."""
    files = files_digest((r.image for r in pairs.records), base)
    if path.is_file():
        files = _sha([file_sha256(path), files])
    return {
        "kind": kind,
        "path": str(path),
        "files": files,
        "samples": len(pairs.records),
        "captions": captions_digest(r.captions for r in pairs.records),
    }


def shards_fingerprint(pattern: str, urls: Sequence[str]) -> dict[str, Any]:
    """Shards by name, size and mtime (counting samples or captions would read every tar)."""
    base = Path(urls[0]).parent if urls else Path(".")
    return {
        "kind": "webdataset",
        "path": pattern,
        "files": files_digest((Path(u) for u in urls), base),
        "samples": None,
        "captions": None,
    }


def fingerprint_diff(cached: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a cache's source fingerprint and the data asked for, in words."""
    words = {"kind": "data kind", "files": "files (paths, sizes, mtimes)", "samples": "listed samples",
             "captions": "captions"}  # fmt: skip
    out = []
    for key in COMPARED:
        a, b = cached.get(key), current.get(key)
        if key in ("samples", "captions") and (a is None or b is None):
            continue  # not known without reading every shard
        if a != b:
            if key in ("files", "captions"):
                out.append(f"{words[key]} differ")
            else:
                out.append(f"{words[key]}: cache has {a!r}, data has {b!r}")
    return out
