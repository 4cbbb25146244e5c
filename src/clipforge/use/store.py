"""The embedding directory `embed` writes and `index` / `search` read. Plain files, readable with numpy
and pyarrow alone:

    DIR/manifest.json              model (fingerprint, source, runtime), preprocessing, dim, dtype,
                                   modality, parts (rows, first id, skips by reason), totals, complete
    DIR/img_emb/part-00000.npy     (rows, D) float16|float32, L2-normalised, row i <-> metadata row i
    DIR/text_emb/part-00000.npy    the same for captions
    DIR/metadata/part-00000.parquet   id (int64, global row id), key, path, caption, width, height
    DIR/skipped/part-00000.jsonl   {"key", "reason", "detail"} per input skipped in that part
    DIR/skipped.log                every skipped input of every part, one "reason<TAB>name" per line

A part's files are written under temporary names and renamed, then the manifest names the part:
what the manifest names is finished; anything else is the leftover of an interrupted run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "clipforge-embeddings"
EMB_DIRS = {"image": "img_emb", "text": "text_emb"}
PART_DIRS = (*EMB_DIRS.values(), "metadata", "skipped")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `clipforge embed ... --out {directory}` first")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a clipforge embeddings manifest (format {manifest.get('format')!r})")
    return manifest


class EmbeddingStore:
    """Read access to an embedding directory: vectors by part or by id (memory-mapped), metadata."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir)
        self.parts: list[dict[str, Any]] = self.manifest["parts"]
        self._first = np.array([p["first_id"] for p in self.parts], dtype=np.int64)
        self._arrays: dict[tuple[str, int], np.ndarray] = {}

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def modalities(self) -> list[str]:
        return list(self.manifest["modalities"])

    def _check(self, modality: str) -> None:
        if modality not in self.modalities():
            raise ValueError(f"{self.dir} holds {' and '.join(self.modalities())} embeddings, not {modality}")

    def part_array(self, modality: str, index: int) -> np.ndarray:
        """(rows, D) memory-mapped embeddings of part `index`."""
        self._check(modality)
        k = (modality, index)
        if k not in self._arrays:
            path = self.dir / EMB_DIRS[modality] / f"{self.parts[index]['name']}.npy"
            self._arrays[k] = np.load(path, mmap_mode="r")
        return self._arrays[k]

    def iter_parts(self, modality: str) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        for i, part in enumerate(self.parts):
            yield part, self.part_array(modality, i)

    def vectors(self, ids: np.ndarray | list[int], modality: str = "image") -> np.ndarray:
        """(len(ids), D) float32 embeddings of global row ids."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.count):
            raise KeyError(
                f"ids out of range 0..{self.count - 1}: {ids[(ids < 0) | (ids >= self.count)][:5]}"
            )
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        which = np.searchsorted(self._first, ids, side="right") - 1
        # one fancy-indexed read per part, not one per id: an IVF-PQ rerank reads hundreds per query
        for w in np.unique(which).tolist():
            sel = which == w
            out[sel] = self.part_array(modality, w)[ids[sel] - self.parts[w]["first_id"]]
        return out

    def metadata(self, columns: list[str] | None = None):
        """A pyarrow Table of every part's metadata, in id order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [
            pq.read_table(self.dir / "metadata" / f"{p['name']}.parquet", columns=columns) for p in self.parts
        ]
        if not tables:
            return pa.table({c: [] for c in (columns or ["id", "key"])})
        return pa.concat_tables(tables)

    def done_keys(self) -> set[str]:
        """Keys of every input a finished part holds or skipped (what a resumed run passes over)."""
        keys = set(self.metadata(["key"]).column("key").to_pylist()) if self.parts else set()
        for p in self.parts:
            path = self.dir / "skipped" / f"{p['name']}.jsonl"
            if path.is_file():
                for line in path.read_text(encoding="utf-8").splitlines():
                    key = json.loads(line)["key"]
                    if key:
                        keys.add(key)
        return keys
