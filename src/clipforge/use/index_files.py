"""Where an index lives in an embedding directory (shared by index.py, search.py and tune.py, which
would otherwise import each other in a cycle): DIR/index/<modality>.json names the current index file;
DIR/index/<modality>.deleted.npy holds the deleted ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def index_paths(directory: Path, modality: str) -> tuple[Path, Path, Path]:
    """(index file named by the JSON, the JSON, the deleted ids)."""
    d = directory / "index"
    info = d / f"{modality}.json"
    name = json.loads(info.read_text(encoding="utf-8"))["file"] if info.is_file() else f"{modality}.faiss"
    return d / name, info, d / f"{modality}.deleted.npy"


def read_deleted(directory: str | Path, modality: str = "image") -> np.ndarray:
    path = index_paths(Path(directory), modality)[2]
    return np.load(path) if path.is_file() else np.zeros(0, dtype=np.int64)
