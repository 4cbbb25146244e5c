"""Writing an embedding cache: run a locked image tower once over a source's samples (LiT, Table 7).

    cache = write_cache(tower, source.samples, "cache/", transform=cache_transform(pre, "none"),
                        preprocess=spec, source=source.fingerprint(), views=4)
    cache = cache_embeddings(tower, dataset, "cache/", preprocess=spec)   # a map-style Dataset instead

Rows are the readable samples in source order; an unreadable one is skipped and counted (never replaced
by a neighbour), every skip is named in `skipped.log`. Layout of the directory:
- `index.json`: format, tower fingerprint (weights + preprocessing and augmentation), views, dtype,
  shard_size, seed, the source's fingerprint, then when complete: num_samples, dim, shards, the sha256
  of the captions in row order and the skip counts;
- `shard_00000.npy` ... (rows, views, dim) arrays, memory-mapped when read, each with
  `shard_00000.json`: the source positions it covers, its rows' names and captions, its skips;
- `captions.jsonl`: every cached sample's captions (one JSON list per line, in row order).
View k of row i is transformed with every RNG seeded from (seed, k, i).

Resumable: a shard's .json then its .npy are written to temporary files and renamed; a rerun keeps every
finished shard and re-reads the source from the end of the previous one (positions count every listed
sample, so no image is decoded to find the place). Another tower, preprocessing, layout or source in the
same directory is refused (CacheMismatchError).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..files import is_leftover, write_json_atomic, write_npy_atomic, write_text_atomic
from ..transforms import PreprocessConfig, eval_transform, train_transform
from .embedding_cache import (
    CACHE_FORMAT,
    CAPTIONS_FILE,
    INDEX_FILE,
    SKIP_LOG,
    CacheMismatchError,
    EmbeddingCache,
    _mismatch,
    tower_fingerprint,
)
from .ordered import Sample, captions_digest
from .seeding import forked_rng
from .skips import SkipCounter, Skipped

Samples = Callable[[int], Iterator[Sample | Skipped]]  # samples(start): from source position `start`


class SkipLog(SkipCounter):
    """A SkipCounter that keeps every (reason, detail), not a few examples: the cache's skipped.log."""

    def __init__(self, source: str = "") -> None:
        super().__init__(source)
        self.entries: list[tuple[str, str]] = []

    def record(self, reason: str, detail: str = "", n: int = 1) -> None:
        super().record(reason, detail, n)
        self.entries.extend([(reason, detail)] * n)


def cache_transform(pre: PreprocessConfig, augment: str = "none") -> Callable[[Any], torch.Tensor]:
    """Image -> model input: PIL images through the eval (augment="none") or training transform; uint8
    tensors (the synthetic set, rendered at the input size) normalised with the tower's mean/std."""
    tf = eval_transform(pre) if augment == "none" else train_transform(pre, augment)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(3, 1, 1)

    def apply(image: Any) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return (image.float() / 255.0 - mean) / std
        return tf(image)

    return apply


def _view_seed(seed: int, view: int, index: int) -> int:
    return ((seed * 1_000_003 + view) * 1_000_000_007 + index) & 0x7FFF_FFFF_FFFF


def _write_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj, indent=1, ensure_ascii=False)


def write_cache(
    tower: nn.Module,
    samples: Samples,
    out_dir: str | Path,
    *,
    transform: Callable[[Any], torch.Tensor],
    preprocess: Mapping[str, Any],
    source: Mapping[str, Any] | None = None,
    views: int = 1,
    batch_size: int = 256,
    shard_size: int = 8192,
    seed: int = 0,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    listed_skips: list[tuple[str, str]] | None = None,
    progress: bool = True,
) -> EmbeddingCache:
    """Run `tower` (images (B, 3, S, S) -> (B, D)) over every readable sample once per view; write the
    cache (see the module docstring). `listed_skips`: what the source dropped while listing its samples
    (bad manifest rows, empty captions), logged with the rest. Returns the finished cache."""
    if views < 1 or batch_size < 1 or shard_size < 1:
        raise ValueError(
            f"views, batch_size and shard_size must be >= 1, got {views}, {batch_size}, {shard_size}"
        )
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = {
        "format": CACHE_FORMAT,
        "fingerprint": tower_fingerprint(tower, preprocess),
        "views": views,
        "dtype": dtype,
        "shard_size": shard_size,
        "seed": seed,
        "source": json.loads(json.dumps(dict(source))) if source is not None else None,
    }
    index_path = out / INDEX_FILE
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        msg = _mismatch({k: index.get(k) for k in layout}, layout, out)
        if msg:
            raise CacheMismatchError(msg + "; use another directory or delete this one")
        if index.get("complete") and all((out / s).is_file() for s in index["shards"]):
            return EmbeddingCache(out, fingerprint=layout["fingerprint"])
    _write_json(index_path, {**layout, "complete": False})
    device = torch.device(device)
    was_training = tower.training
    tower.eval().to(device)
    np_dtype = np.dtype(dtype)
    bar = tqdm(desc="embeddings", unit="img", disable=not progress, dynamic_ncols=True)

    def embed(batch: list[tuple[int, Sample]]) -> np.ndarray:  # -> (b, views, D)
        per_view = []
        for view in range(views):
            imgs = []
            for row, item in batch:
                with forked_rng(_view_seed(seed, view, row)):  # the augmentation of (view, row)
                    imgs.append(transform(item.image))
            per_view.append(tower(torch.stack(imgs).to(device)).float().cpu().numpy())
        bar.update(len(batch) * views)
        return np.stack(per_view, axis=1)

    metas: list[dict[str, Any]] = []
    tail_skips: list[list[str]] = []
    try:
        with torch.inference_mode():
            pos, row, s = 0, 0, 0
            it: Iterator[Sample | Skipped] | None = None
            while True:
                npy, meta_path = out / f"shard_{s:05d}.npy", out / f"shard_{s:05d}.json"
                if npy.is_file() and meta_path.is_file():
                    meta = json.loads(meta_path.read_text(encoding="utf-8"))
                    if meta["start"] == pos:  # finished by an earlier run: keep it, skip its positions
                        metas.append(meta)
                        pos, row, s, it = meta["end"], row + meta["rows"], s + 1, None
                        continue
                if it is None:
                    it = samples(pos)
                start, chunks, batch = pos, [], []
                meta = {"start": start, "rows": 0, "names": [], "captions": [], "skipped": []}
                for item in it:
                    pos += 1
                    if isinstance(item, Skipped):
                        meta["skipped"].append([item.reason, item.detail])
                        continue
                    batch.append((row + meta["rows"], item))
                    meta["rows"] += 1
                    meta["names"].append(item.name)
                    meta["captions"].append(list(item.captions))
                    if len(batch) == batch_size:
                        chunks.append(embed(batch))
                        batch = []
                    if meta["rows"] == shard_size:
                        break
                if batch:
                    chunks.append(embed(batch))
                if not meta["rows"]:  # the source is exhausted
                    tail_skips = meta["skipped"]
                    break
                meta["end"] = pos
                arr = np.concatenate(chunks).astype(np_dtype)
                _write_json(meta_path, meta)
                write_npy_atomic(npy, arr)  # a shard exists only once it is complete
                metas.append(meta)
                row, s = row + meta["rows"], s + 1
    finally:
        bar.close()
        tower.train(was_training)
        for f in out.glob(".shard_*"):
            if is_leftover(f):
                f.unlink(missing_ok=True)
    return _finish(out, layout, metas, listed_skips or [], tail_skips)


def _finish(out: Path, layout: dict, metas: list[dict], listed: list, tail: list) -> EmbeddingCache:
    """captions.jsonl, skipped.log and the complete index.json from the shards' records."""
    skipped = (
        [tuple(x) for x in listed]
        + [tuple(x) for m in metas for x in m["skipped"]]
        + [tuple(x) for x in tail]
    )
    counts: dict[str, int] = {}
    for reason, _ in skipped:
        counts[reason] = counts.get(reason, 0) + 1
    rows = [c for m in metas for c in m["captions"]]
    log = "".join(f"{reason}\t{detail}\n" for reason, detail in skipped)
    write_text_atomic(out / SKIP_LOG, log)
    if not rows:
        why = ", ".join(f"{k} {v}" for k, v in counts.items()) or "the source lists none"
        raise ValueError(f"{out}: no readable samples to cache ({why}); see {out / SKIP_LOG}")
    if layout["source"] is not None:  # a Dataset's items carry no captions (see cache_embeddings)
        write_text_atomic(
            out / CAPTIONS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        )
    first = np.load(out / "shard_00000.npy", mmap_mode="r")
    index = {
        **layout,
        "complete": True,
        "num_samples": len(rows),
        "dim": int(first.shape[-1]),
        "shards": [f"shard_{s:05d}.npy" for s in range(len(metas))],
        "captions_sha256": captions_digest(rows),
        "skipped": counts,
    }
    _write_json(out / INDEX_FILE, index)
    return EmbeddingCache(out, fingerprint=layout["fingerprint"])


def _image_of(item: Any) -> torch.Tensor:
    if isinstance(item, Mapping):
        return item["image"]
    if isinstance(item, (tuple, list)):
        return item[0]
    return item


def cache_embeddings(
    tower: nn.Module,
    dataset: Dataset,
    out_dir: str | Path,
    *,
    preprocess: Mapping[str, Any],
    views: int = 1,
    batch_size: int = 256,
    shard_size: int = 8192,
    seed: int = 0,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> EmbeddingCache:
    """The cache of a map-style dataset whose items are {"image": tensor, ...}, (image, ...) or an image
    tensor (already transformed: dataset[i] runs under the view's seeded RNG). No captions are stored;
    pair the cache with texts through `CachedPairs`."""
    n = len(dataset)
    if n == 0:
        raise ValueError("cache_embeddings: the dataset is empty")

    def samples(start: int) -> Iterator[Sample]:
        return (Sample(i, (), str(i)) for i in range(start, n))

    return write_cache(tower, samples, out_dir, transform=lambda i: _image_of(dataset[i]),
                       preprocess=preprocess, source=None, views=views, batch_size=batch_size,
                       shard_size=shard_size, seed=seed, dtype=dtype, device=device,
                       progress=progress)  # fmt: skip
