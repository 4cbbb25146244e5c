"""What the HTTP routes call: a model, an optional index, the batchers, caches and the add-while-serving
path. No HTTP here beyond ApiError, so tests can drive it directly.

The model runs only in the batchers' threads; decoding and preprocessing run in the default thread
pool; faiss searches run there too (a search reads the Searcher it started with, so an index swap by
`add_images` never changes an answer half way).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..eval.templates import format_template
from ..transforms import ImageLoadError, load_image
from ..use.classify import label_probabilities
from ..use.embedder import append_rows
from ..use.encoders import Encoder
from ..use.index import build_index
from ..use.index_files import index_paths
from ..use.search import Searcher
from .batcher import Batcher
from .config import ServeConfig
from .errors import ApiError
from .images import open_upload, thumbnail_jpeg
from .metrics import ServerMetrics

UPLOADS = "uploads"  # DIR/uploads/: images added through the server (so their thumbnails can be served)
RESULT_FIELDS = ("key", "caption", "width", "height")  # metadata returned; `path` stays on the server


class _Lru(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.lock = size, threading.Lock()

    def get_item(self, key: Any) -> Any:
        with self.lock:
            if key in self:
                self.move_to_end(key)
                return self[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self[key] = value
            self.move_to_end(key)
            while len(self) > self.size:
                self.popitem(last=False)


class Service:
    def __init__(
        self,
        encoder: Encoder,
        config: ServeConfig,
        index_dir: str | Path | None = None,
        modality: str = "image",
    ) -> None:
        self.encoder, self.cfg = encoder, config
        self.metrics = ServerMetrics()
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self.modality = modality
        self.searcher: Searcher | None = None
        if self.index_dir is not None:
            self.searcher = Searcher(self.index_dir, modality, encoder=encoder)
            self.searcher.encoder  # noqa: B018 (checks the model made this index: fails at start, not per request)
            self.metrics.index_vectors.set(value=self.searcher.index.ntotal)
        common = dict(
            enabled=config.batching,
            max_batch=config.max_batch,
            window_s=config.batch_window_ms / 1000,
            max_queue=config.max_queue,
        )
        self.text = Batcher("text", self._forward_texts, self.metrics, **common)
        self.image = Batcher("image", self._forward_pixels, self.metrics, **common)
        self._labels = _Lru(64)  # (labels, templates) -> (C, D) label vectors
        self._thumbs = _Lru(config.thumbnail_cache)
        self._add_lock = threading.Lock()

    def close(self) -> None:
        self.text.close()
        self.image.close()

    def describe(self) -> dict[str, Any]:
        index = None
        if self.searcher is not None:
            s = self.searcher
            index = {"count": int(s.index.ntotal), "kind": s.info["kind"], "modality": self.modality}
        return {
            "model": self.encoder.describe(),
            "index": index,
            "batching": self.cfg.batching,
            "max_k": self.cfg.max_k,  # the page asks for at most this many results
        }

    # ---------------------------------------------------------------------------------------------
    # the two towers (run in the batchers' threads)

    def _forward_texts(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.encoder.encode_texts(texts).numpy())

    def _forward_pixels(self, pixels: list[torch.Tensor]) -> list[np.ndarray]:
        return list(self.encoder.encode_pixels(torch.stack(pixels)).numpy())

    def check_texts(self, texts: Sequence[Any], what: str = "texts") -> list[str]:
        if not isinstance(texts, list | tuple) or not texts:
            raise ApiError(400, "empty_text", f"{what}: give a non-empty list of strings")
        if len(texts) > self.cfg.max_items:
            raise ApiError(
                413, "too_many", f"{what}: {len(texts)} items, above the limit of {self.cfg.max_items}"
            )
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ApiError(
                    422, "invalid_request", f"{what}[{i}] must be a string, got {type(t).__name__}"
                )
            if not t.strip():
                raise ApiError(400, "empty_text", f"{what}[{i}] is empty: give some text")
            if len(t) > self.cfg.max_text_chars:
                raise ApiError(
                    413,
                    "text_too_long",
                    f"{what}[{i}] has {len(t)} characters, above the limit of "
                    f"{self.cfg.max_text_chars} (the model reads only the first 77 tokens)",
                )
        if self.encoder.tokenizer is None:
            raise ApiError(
                400,
                "no_tokenizer",
                f"{self.encoder.source}: the model has no tokenizer, so it cannot read text",
            )
        return list(texts)

    async def embed_texts(self, texts: Sequence[Any]) -> np.ndarray:
        """(N, D) unit text vectors."""
        rows = await self.text.submit(self.check_texts(texts))
        return np.stack(rows)

    def _prepare(
        self, uploads: Sequence[tuple[str, bytes]], reduced_side: int | None
    ) -> list[tuple[Any, tuple[int, int], torch.Tensor]]:
        out = []
        for name, data in uploads:
            img, size = open_upload(data, name, self.cfg, reduced_side)
            out.append((img, size, self.encoder.preprocess(img)))
        return out

    def check_uploads(self, uploads: Sequence[tuple[str, bytes]]) -> None:
        if not uploads:
            raise ApiError(400, "no_image", "no image given: upload a file or send base64 in `images`")
        if len(uploads) > self.cfg.max_items:
            raise ApiError(413, "too_many", f"{len(uploads)} images, above the limit of {self.cfg.max_items}")

    async def embed_images(
        self, uploads: Sequence[tuple[str, bytes]], fast_decode: bool = False
    ) -> tuple[np.ndarray, list[tuple[Any, tuple[int, int]]]]:
        """((N, D) unit image vectors, the decoded images with their full upright sizes). `fast_decode`:
        JPEGs decoded at reduced scale, as `embed --fast-decode` does (for adds to such an index)."""
        self.check_uploads(uploads)
        side = self.encoder.preprocess_config.image_size if fast_decode else None
        prepared = await asyncio.to_thread(self._prepare, uploads, side)
        rows = await self.image.submit([p for _, _, p in prepared])
        return np.stack(rows), [(img, size) for img, size, _ in prepared]

    # ---------------------------------------------------------------------------------------------
    # classify

    async def label_vectors(self, labels: Sequence[Any], templates: Sequence[Any]) -> torch.Tensor:
        labels = self.check_texts(labels, "labels") if len(labels) <= self.cfg.max_labels else None
        if labels is None:
            raise ApiError(413, "too_many", f"labels: above the limit of {self.cfg.max_labels}")
        if len(templates) > self.cfg.max_templates:
            raise ApiError(413, "too_many", f"templates: above the limit of {self.cfg.max_templates}")
        key = (tuple(labels), tuple(templates))
        cached = self._labels.get_item(key)
        if cached is not None:
            return cached
        try:
            texts = [format_template(t, label) for label in labels for t in templates]  # label-major
        except (ValueError, TypeError) as e:
            raise ApiError(400, "bad_template", f"templates: {e}") from None
        feats: list[np.ndarray] = []
        for i in range(0, len(texts), self.cfg.max_batch):  # a long label list: several forwards
            feats += await self.text.submit(texts[i : i + self.cfg.max_batch])
        vecs = torch.from_numpy(np.stack(feats)).view(len(labels), len(templates), -1).mean(dim=1)
        vecs = F.normalize(vecs, dim=-1)
        self._labels.put(key, vecs)
        return vecs

    async def classify(
        self,
        uploads: Sequence[tuple[str, bytes]],
        labels: Sequence[Any],
        templates: Sequence[Any],
        top_k: int,
    ) -> list[dict[str, Any]]:
        templates = list(templates) or ["{}"]
        if not all(isinstance(t, str) for t in templates):
            raise ApiError(400, "bad_template", "templates: give strings with a {} placeholder")
        self.check_uploads(uploads)
        weights = await self.label_vectors(list(labels), templates)
        feats, _ = await self.embed_images(uploads)
        probs = label_probabilities(self.encoder, torch.from_numpy(feats), weights)
        k = max(1, min(top_k, len(labels)))
        p, idx = probs.topk(k, dim=-1)
        return [
            {"labels": [labels[i] for i in row_i], "scores": [round(x, 6) for x in row_p]}
            for row_p, row_i in zip(p.tolist(), idx.tolist())
        ]

    # ---------------------------------------------------------------------------------------------
    # search, thumbnails, adding

    def _need_index(self) -> Searcher:
        if self.searcher is None:
            raise ApiError(404, "no_index", "this server has no index: start it with --index DIR")
        return self.searcher

    def check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.cfg.max_k:
            raise ApiError(422, "bad_k", f"k must be an integer from 1 to {self.cfg.max_k}, got {k!r}")
        return k

    def vector_of(self, row_id: Any) -> np.ndarray:
        s = self._need_index()
        if isinstance(row_id, bool) or not isinstance(row_id, int):  # 1.0, "4", true: a type error, not a row
            raise ApiError(422, "bad_id", f"id must be an integer row id, got {row_id!r}")
        if not 0 <= row_id < s.store.count:
            raise ApiError(
                404, "unknown_id", f"no row {row_id!r} in the index (ids are 0..{s.store.count - 1})"
            )
        return s.store.vectors([row_id], self.modality)

    def check_vector(self, vector: Any) -> np.ndarray:
        s = self._need_index()
        try:
            v = np.asarray(vector, dtype=np.float32)
        except (TypeError, ValueError):
            raise ApiError(422, "bad_vector", "vector: give a list of numbers") from None
        if v.shape != (s.store.dim,):
            raise ApiError(
                422, "bad_vector", f"vector: {v.size} values; the index holds {s.store.dim}-d vectors"
            )
        if not np.all(np.isfinite(v)) or not np.any(v):
            raise ApiError(422, "bad_vector", "vector: values must be finite and not all zero")
        return v[None]

    async def search(self, query: np.ndarray, k: int, dedup: float | None = None) -> list[dict[str, Any]]:
        s = self._need_index()
        hits = (await asyncio.to_thread(s.search, query, k, dedup))[0]
        out = []
        for h in hits:
            row = {"id": h["id"], "score": round(h["score"], 6), **{f: h.get(f) for f in RESULT_FIELDS}}
            row["thumbnail"] = f"/v1/thumbnail/{h['id']}"
            out.append(row)
        return out

    def _thumbnail(self, row_id: int, size: int) -> bytes:
        s = self._need_index()
        if not 0 <= row_id < s.store.count or row_id in s.deleted:
            raise ApiError(404, "unknown_id", f"no row {row_id} in the index")
        cached = self._thumbs.get_item((row_id, size))
        if cached is not None:
            return cached
        # the file named by the index's own metadata: a request chooses a row id, never a path
        path = s.metadata([row_id])[0].get("path")
        if not path:
            raise ApiError(404, "no_image", f"row {row_id} has no image file")
        try:
            img = load_image(path, max_pixels=self.cfg.max_pixels, max_aspect=self.cfg.max_aspect)
        except FileNotFoundError:
            raise ApiError(404, "image_missing", f"the image file of row {row_id} is gone") from None
        except (ImageLoadError, OSError) as e:
            raise ApiError(
                404, "image_unreadable", f"the image file of row {row_id} is unreadable ({e})"
            ) from None
        jpeg = thumbnail_jpeg(img, size)
        self._thumbs.put((row_id, size), jpeg)
        return jpeg

    async def thumbnail(self, row_id: int, size: int | None = None) -> bytes:
        size = self.cfg.thumbnail_size if size is None else size  # size=0 is out of range, not 'default'
        if not 16 <= size <= 1024:
            raise ApiError(422, "bad_size", f"size must be from 16 to 1024 pixels, got {size}")
        return await asyncio.to_thread(self._thumbnail, row_id, size)

    async def add_images(
        self, uploads: Sequence[tuple[str, bytes]], captions: Sequence[str | None] | None = None
    ) -> list[int]:
        """Embed the uploads, keep them under DIR/uploads/, append them as a new part and grow the index
        (build_index adds only that part); later searches see them. Returns their row ids."""
        s = self._need_index()
        modalities = s.store.modalities()
        self.check_uploads(uploads)  # no image at all is the first thing to say
        if captions is None and "text" in modalities:
            raise ApiError(
                422, "bad_captions", "this index embeds captions too: give captions, one per image"
            )
        captions = list(captions) if captions is not None else [None] * len(uploads)
        if len(captions) != len(uploads):
            raise ApiError(422, "bad_captions", f"{len(uploads)} images but {len(captions)} captions")
        if "text" in modalities:
            captions = self.check_texts(captions, "captions")  # this index embeds captions too
        elif not all(c is None or isinstance(c, str) for c in captions):  # they go into the metadata
            raise ApiError(422, "bad_captions", "captions: give strings (or null), one per image")
        fast_decode = bool(s.store.manifest.get("fast_decode", False))  # decode as the collection was
        feats, images = await self.embed_images(uploads, fast_decode)
        text_feats = await self.embed_texts(captions) if "text" in modalities else None
        data = [d for _, d in uploads]
        return await asyncio.to_thread(self._append, images, data, captions, feats, text_feats, fast_decode)

    def _append(self, images, data, captions, feats, text_feats, fast_decode: bool) -> list[int]:
        assert self.index_dir is not None
        with self._add_lock:  # one writer: parts are numbered from the manifest
            folder = self.index_dir / UPLOADS
            folder.mkdir(exist_ok=True)
            rows: dict[str, list] = {f: [] for f in ("key", "path", "caption", "width", "height")}
            for (img, (width, height)), raw, caption in zip(images, data, captions):
                digest = hashlib.sha256(raw).hexdigest()[:20]
                path = folder / f"{digest}.png"  # the decoded pixels, re-encoded: nothing else is kept
                if not path.exists():
                    img.save(path, format="PNG")
                rows["key"].append(f"{UPLOADS}/{digest}.png")
                rows["path"].append(str(path.resolve()))  # absolute: the server may run from anywhere
                rows["caption"].append(caption)
                rows["width"].append(width)
                rows["height"].append(height)
            feat_map = {"image": feats} if text_feats is None else {"image": feats, "text": text_feats}
            part = append_rows(self.index_dir, rows, feat_map, self.encoder.fingerprint, fast_decode)
            build_index(self.index_dir, modality=self.modality)
            for other in feat_map.keys() - {self.modality}:  # an index of the other modality grows too
                if index_paths(self.index_dir, other)[1].is_file():
                    build_index(self.index_dir, modality=other)
            self.searcher = Searcher(self.index_dir, self.modality, encoder=self.encoder)
            self.metrics.index_vectors.set(value=self.searcher.index.ntotal)
            return list(range(part["first_id"], part["first_id"] + part["rows"]))
