"""Search an indexed embedding directory by text, image file, row id or raw vector.

    s = Searcher("emb/")                                   # the image index; modality="text" for captions
    hits = s.search(s.query(text="a dog on a beach"), k=10)[0]
    # [{"id": 12, "score": 0.31, "key": "dogs/1.jpg", "path": ..., "caption": ..., "width": .., "height": ..}]

Scores are cosine similarities. `dedup=0.94` collapses near-duplicates (clip-retrieval's threshold):
walking the hits best first, one whose cosine to a hit already kept is >= the threshold is dropped.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..transforms import load_image
from .encoders import Encoder, open_encoder
from .index_files import index_paths, read_deleted
from .store import EmbeddingStore


def _as_queries(q: np.ndarray) -> np.ndarray:
    q = np.atleast_2d(np.asarray(q, dtype=np.float32))
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise ValueError("a query vector is all zeros")
    return np.ascontiguousarray(q / norms)


class Searcher:
    """An index opened for searching (see the module docstring). `nprobe` (IVF-PQ lists visited),
    `ef_search` (HNSW) and `rerank` (IVF-PQ candidates per result, rescored exactly) trade speed for
    recall. Their defaults are those `tune_search` chose for the index's target recall (the "search"
    entry of DIR/index/<modality>.json), else fixed ones; arguments given here win."""

    def __init__(
        self,
        directory: str | Path,
        modality: str = "image",
        *,
        encoder: Encoder | str | Path | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        rerank: int | None = None,
    ) -> None:
        import faiss

        self.dir = Path(directory)
        self.store = EmbeddingStore(self.dir)
        self.modality = modality
        index_path, info_path, _ = index_paths(self.dir, modality)
        if not info_path.is_file():
            raise FileNotFoundError(
                f"no {modality} index in {self.dir}: run `clipforge index {self.dir}` first"
            )
        self.info = json.loads(info_path.read_text(encoding="utf-8"))
        self.index = faiss.read_index(str(index_path))
        self._warn_if_stale()
        self._deleted = read_deleted(self.dir, modality)
        self.deleted = set(self._deleted.tolist())
        tuned = self.info.get("search", {})
        self.rerank = 1
        if self.info["kind"] == "ivfpq":
            nlist = self.info["params"]["nlist"]
            self.rerank = max(1, rerank or tuned.get("rerank") or 10)
            self.index.nprobe = max(1, nprobe or tuned.get("nprobe") or min(nlist, max(16, nlist // 4)))
        elif self.info["kind"] == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = max(
                1, ef_search or tuned.get("ef_search") or 256
            )
        self._encoder = encoder
        self._meta = None

    def _warn_if_stale(self) -> None:
        """Say so when parts were embedded after the index was built (`embed --append` without `index`):
        their rows are in the store but not in the index, and searches would miss them silently. A
        warning, not a rebuild: searching writes nothing (the directory may be read-only or grown by
        another process at the same time), and growing may retune the index, which takes a while."""
        indexed = set(self.info["parts"])
        missing = [p for p in self.store.parts if p["name"] not in indexed]
        rows = sum(p["rows"] for p in missing)
        if not rows:
            return
        names = ", ".join(p["name"] for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
        flag = "" if self.modality == "image" else f" --modality {self.modality}"
        warnings.warn(
            f"{self.dir}: the {self.modality} index covers {self.store.count - rows} of the "
            f"{self.store.count} stored rows; searches miss the other {rows} (in {names}, embedded "
            f"after the index was built): run `clipforge index {self.dir}{flag}`",
            stacklevel=3,
        )

    @property
    def encoder(self) -> Encoder:
        """The model that made the embeddings (from the manifest unless one was given); its fingerprint
        must match the directory's."""
        if not isinstance(self._encoder, Encoder):
            model = self._encoder or self.store.manifest["model"]["source"]
            model = model.removeprefix("preset:") if isinstance(model, str) else model
            runtime = (
                "onnx"
                if isinstance(model, str | Path) and Path(model, "clipforge_onnx.json").is_file()
                else "torch"
            )
            self._encoder = open_encoder(model, runtime)
        want = self.store.manifest["model"]["fingerprint"]
        if self._encoder.fingerprint != want:
            raise ValueError(
                f"{self._encoder.source} is not the model that made {self.dir} (fingerprint "
                f"{self._encoder.fingerprint}, expected {want}): pass the right --model"
            )
        return self._encoder

    def query(
        self,
        *,
        text: str | Sequence[str] | None = None,
        image: str | Path | None = None,
        id: int | None = None,
        vector: np.ndarray | Sequence[float] | None = None,
    ) -> np.ndarray:
        """(Q, D) unit query vectors from exactly one of: text(s), an image file, a row id, a vector."""
        given = [x is not None for x in (text, image, id, vector)]
        if sum(given) != 1:
            raise ValueError("give exactly one query: text, image, id or vector")
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            return _as_queries(self.encoder.encode_texts(texts).numpy())
        if image is not None:
            enc = self.encoder
            return _as_queries(enc.encode_pixels(enc.preprocess(load_image(image))[None]).numpy())
        if id is not None:
            return _as_queries(self.store.vectors([id], self.modality))
        q = _as_queries(vector)
        if q.shape[1] != self.store.dim:
            raise ValueError(
                f"query vector has {q.shape[1]} values; the index holds {self.store.dim}-d vectors"
            )
        return q

    def metadata(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        if self._meta is None:
            self._meta = self.store.metadata()
        return self._meta.take(np.asarray(ids, dtype=np.int64)).to_pylist()

    def candidates(self, queries: np.ndarray, fetch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(scores, ids) per query row, best first: the index's top `fetch`, deleted ids dropped,
        IVF-PQ candidates rescored exactly. `queries` must be unit rows (see `_as_queries`)."""
        scores, ids = self.index.search(queries, min(fetch, max(1, self.index.ntotal)))
        return [self.refine(q, s, i) for q, s, i in zip(queries, scores, ids)]

    def refine(self, query: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One query's raw index hits -> (scores, ids) best first: padding (-1) and deleted ids dropped;
        for IVF-PQ the approximate scores are replaced by exact cosines from the stored vectors."""
        keep = ids >= 0
        if len(self._deleted):
            keep &= ~np.isin(ids, self._deleted)
        scores, ids = scores[keep], ids[keep]
        if self.info["kind"] == "ivfpq" and len(ids):
            scores = self.store.vectors(ids, self.modality) @ query
            order = np.argsort(-scores, kind="stable")
            scores, ids = scores[order], ids[order]
        return scores.astype(np.float32), ids.astype(np.int64)

    def search(self, queries: np.ndarray, k: int = 10, dedup: float | None = None) -> list[list[dict]]:
        """Top-k hits per query row, best first, with their metadata."""
        queries = _as_queries(queries)
        fetch = k * self.rerank * (4 if dedup else 1) + (
            len(self.deleted) if self.info["kind"] == "hnsw" else 0
        )
        out = []
        for scores, ids in self.candidates(queries, fetch):
            if dedup and len(ids):
                chosen = _dedup(self.store.vectors(ids, self.modality), dedup, k)
            else:
                chosen = list(range(min(k, len(ids))))
            meta = self.metadata(ids[chosen])
            out.append([{**m, "id": int(ids[j]), "score": float(scores[j])} for j, m in zip(chosen, meta)])
        return out


def _dedup(vecs: np.ndarray, threshold: float, k: int) -> list[int]:
    """Indexes of hits kept, best first, none within `threshold` cosine of an earlier kept one."""
    kept: list[int] = []
    for j in range(len(vecs)):
        if kept and float(np.max(vecs[kept] @ vecs[j])) >= threshold:
            continue
        kept.append(j)
        if len(kept) == k:
            break
    return kept
