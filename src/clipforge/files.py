"""Atomic writes: every file or directory clipforge writes appears complete under its final name or not at
all (a temporary sibling, fsync, then `os.replace`), with the permissions a plain `open`/`mkdir` would give.

Temporary siblings are named `.NAME.tmp-XXXX` (hidden, and recognisable by `is_leftover`), so a reader that
lists a folder never sees them and a resumed run can delete what an interrupted one left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def is_leftover(path: Path) -> bool:
    """Whether `path` is the temporary sibling of an atomic write that never finished."""
    return path.name.startswith(".") and TMP_MARK in path.name


def current_umask() -> int:
    try:  # Linux: read it without setting it (os.umask's set-and-restore races with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def usual_permissions(path: Path) -> None:
    """mkdtemp / mkstemp (and safetensors) create 0700 / 0600: give what a plain open/mkdir would (the
    umask's), so a file written on a shared machine is as readable as any other file there."""
    umask = current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_file(dst: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` (a new empty file next to `dst`), then move it onto `dst`. If `write` raises,
    `dst` is untouched and the temporary file is removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}{TMP_MARK}")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _fsync(tmp)
        usual_permissions(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def write_bytes_atomic(dst: str | Path, data: bytes) -> Path:
    return atomic_file(dst, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(dst: str | Path, text: str) -> Path:
    return atomic_file(dst, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_npy_atomic(dst: str | Path, array: Any) -> Path:
    """`array` in numpy's .npy format under `dst` exactly (np.save given a name would add ".npy")."""
    import numpy as np

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.save(f, array)

    return atomic_file(dst, write)


def write_json_atomic(dst: str | Path, data: Any, **dumps: Any) -> Path:
    """`data` as JSON (`json.dumps(data, **dumps)`, indent 2 unless given) and a newline."""
    dumps.setdefault("indent", 2)
    return write_text_atomic(dst, json.dumps(data, **dumps) + "\n")


@contextmanager
def atomic_directory(dst: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to `dst`; on success it replaces `dst` (a previous one is removed)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}{TMP_MARK}"))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        usual_permissions(tmp)
        old = None
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
        os.replace(tmp, dst)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
