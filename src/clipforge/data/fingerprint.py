"""A dataset's content fingerprint: what a cache of results computed from the dataset is keyed by.

A path alone is not enough: after the files at a path change (a re-exported folder, rewritten shards, an
edited manifest) a path-keyed cache serves the old numbers. Hashing every image would cost a full read,
so files are identified by (relative path, size, mtime_ns), as make and rsync do; a manifest's own bytes
are hashed (rows change without changing its size).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from .pairs import IMAGE_EXTS, MANIFEST_FORMATS, manifest_rows
from .wds import shard_urls


def _stat_line(path: Path, name: str) -> bytes:
    try:
        st = path.stat()
    except OSError:  # a listed image that is missing is part of what the dataset is
        return f"{name}\0missing\n".encode()
    return f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()


def _is_shards(text: str) -> bool:
    return text.endswith(".tar") or "{" in text or "::" in text


def dataset_fingerprint(path: str | Path | Sequence[str | Path]) -> str:
    """A 20-hex-digit hash of a dataset's files: a folder (every file's relative path, size and mtime, and
    every subfolder's path), tar shards (each shard's size and mtime), a manifest (its bytes, plus size and
    mtime of every image path it lists), or a list of any of those."""
    h = hashlib.sha256()
    if not isinstance(path, str | Path):
        for p in path:
            h.update(dataset_fingerprint(p).encode())
        return h.hexdigest()[:20]
    p = Path(path)
    if p.is_dir() and not any(p.glob("*.tar")):
        for f in sorted(p.rglob("*")):
            if f.is_file():
                h.update(_stat_line(f, f.relative_to(p).as_posix()))
            elif f.is_dir():  # an empty class folder is a class: it shifts every label after it
                h.update(f"{f.relative_to(p).as_posix()}/\n".encode())
    elif p.is_dir() or _is_shards(str(path)):
        for url in shard_urls(path):
            h.update(_stat_line(Path(url), url) if "://" not in url else f"{url}\n".encode())
    elif p.is_file() and p.suffix.lower() in MANIFEST_FORMATS:
        h.update(hashlib.sha256(p.read_bytes()).digest())
        seen: set[Path] = set()
        for _, row in manifest_rows(p):  # every value that names an image file, whatever its column
            for v in row.values():
                if isinstance(v, str) and Path(v.strip()).suffix.lower() in IMAGE_EXTS:
                    f = Path(v.strip()) if Path(v.strip()).is_absolute() else p.parent / v.strip()
                    if f not in seen:
                        seen.add(f)
                        h.update(_stat_line(f, str(f)))
    elif p.is_file():
        h.update(_stat_line(p, p.name))
    else:
        h.update(f"{path}\0absent\n".encode())
    return h.hexdigest()[:20]
