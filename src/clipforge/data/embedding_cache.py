"""Precomputed image embeddings of a locked tower (LiT, Zhai et al. 2022, Table 7).

A locked image tower gives the same embedding for the same input at every step, so it can run once:

    cache_embeddings(tower, dataset, "cache/", preprocess=pre.to_dict(), views=4)   # once
    pairs = CachedPairs(EmbeddingCache("cache/", tower=tower, preprocess=pre.to_dict()), tokens)
    # training batches then hold {"image_embedding": (B, D), "text": (B, T)}: the tower never runs

Layout of the cache directory:
- `index.json`: format, the tower fingerprint (sha256 of every weight tensor's name, shape, dtype and
  bytes, and of the preprocessing spec), num_samples, views, dim, dtype, shard_size, seed, shards;
- `shard_00000.npy` ...: numpy arrays (n, views, dim), opened memory-mapped (np.load(mmap_mode="r")),
  so a cache larger than memory costs only what a batch touches.
View k of sample i is `dataset[i]` with every RNG seeded from (seed, k, i): with a random augmentation
in the dataset's transform, K views are K augmented crops (view 0 included); without one they are equal.

Resumable: each shard is written to a temporary file and renamed when done; a rerun skips finished
shards. A directory made by another tower, preprocessing or layout is refused (CacheMismatchError)
instead of silently mixing embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .seeding import forked_rng

CACHE_FORMAT = "clipforge-embeddings"
INDEX_FILE = "index.json"


class CacheMismatchError(ValueError):
    """The cache was made by another tower / preprocessing / layout than the one asking for it."""


def weights_hash(module: nn.Module) -> str:
    """sha256 over every state-dict entry's name, shape, dtype and bytes (exact: any change shows)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tower_fingerprint(tower: nn.Module, preprocess: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies the embeddings: the tower's weights and the preprocessing that fed it."""
    pre = json.loads(json.dumps(dict(preprocess), sort_keys=True, default=list))
    return {"weights": weights_hash(tower), "preprocess": pre}


def _mismatch(found: Mapping[str, Any], expected: Mapping[str, Any], where: Path) -> str | None:
    diffs = [k for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
    if not diffs:
        return None
    parts = [f"{k}: cache has {found.get(k)!r}, expected {expected.get(k)!r}" for k in diffs]
    return f"{where}: the embedding cache was made differently ({'; '.join(parts)})"


def _image_of(item: Any) -> torch.Tensor:
    if isinstance(item, Mapping):
        return item["image"]
    if isinstance(item, (tuple, list)):
        return item[0]
    return item


def _view_seed(seed: int, view: int, index: int) -> int:
    return ((seed * 1_000_003 + view) * 1_000_000_007 + index) & 0x7FFF_FFFF_FFFF


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
    """Run `tower` (images (B, 3, S, S) -> (B, D)) over `dataset` once per view; write the cache.

    dataset items: {"image": tensor, ...}, (image, ...) or an image tensor. The embeddings are the
    tower's raw outputs (unnormalised, as `encode_image` returns them). Returns the finished cache.
    """
    if views < 1 or batch_size < 1 or shard_size < 1:
        raise ValueError(
            f"views, batch_size and shard_size must be >= 1, got {views}, {batch_size}, {shard_size}"
        )
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    n = len(dataset)
    if n == 0:
        raise ValueError("cache_embeddings: the dataset is empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_shards = -(-n // shard_size)
    layout = {
        "format": CACHE_FORMAT,
        "fingerprint": tower_fingerprint(tower, preprocess),
        "num_samples": n,
        "views": views,
        "dtype": dtype,
        "shard_size": shard_size,
        "seed": seed,
        "shards": [f"shard_{s:05d}.npy" for s in range(num_shards)],
    }
    index_path = out / INDEX_FILE
    index = None
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        msg = _mismatch({k: index.get(k) for k in layout}, layout, out)
        if msg:
            raise CacheMismatchError(msg + "; use another directory or delete this one")
    device = torch.device(device)
    was_training = tower.training
    tower.eval().to(device)
    todo = [s for s in range(num_shards) if not (out / layout["shards"][s]).is_file()]
    total = n * views
    bar = tqdm(total=total, initial=total - sum(_shard_len(s, n, shard_size) for s in todo) * views,
               desc="embeddings", unit="img", disable=not progress, dynamic_ncols=True)  # fmt: skip
    np_dtype = np.dtype(dtype)
    try:
        with torch.inference_mode():
            for s in todo:
                start, count = s * shard_size, _shard_len(s, n, shard_size)
                arr = None
                final = out / layout["shards"][s]
                tmp = out / f".{final.name}.tmp-{os.getpid()}"
                for view in range(views):
                    for b in range(start, start + count, batch_size):
                        idx = range(b, min(b + batch_size, start + count))
                        imgs = []
                        for i in idx:
                            with forked_rng(_view_seed(seed, view, i)):
                                imgs.append(_image_of(dataset[i]))
                        emb = tower(torch.stack(imgs).to(device)).float().cpu().numpy()  # (b, D)
                        if arr is None:
                            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype,
                                                            shape=(count, views, emb.shape[1]))  # fmt: skip
                            if index is None:
                                index = {**layout, "dim": int(emb.shape[1])}
                                _write_json(index_path, index)
                        arr[b - start : b - start + len(idx), view] = emb
                        bar.update(len(idx))
                arr.flush()
                del arr
                os.replace(tmp, final)
    finally:
        bar.close()
        tower.train(was_training)
        for f in out.glob(".shard_*.tmp-*"):
            f.unlink(missing_ok=True)
    return EmbeddingCache(out, fingerprint=layout["fingerprint"])


def _shard_len(s: int, n: int, shard_size: int) -> int:
    return min(shard_size, n - s * shard_size)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class EmbeddingCache:
    """Read side: `cache[i]` -> (views, D) float32, `cache.get(i, view)` -> (D,), memory-mapped shards.

    Give `tower` + `preprocess` (or a precomputed `fingerprint`) to refuse a cache of another tower.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        tower: nn.Module | None = None,
        preprocess: Mapping[str, Any] | None = None,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        path = self.directory / INDEX_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.directory}: no embedding cache here (missing {INDEX_FILE}); "
                "run `clipforge cache-embeddings`"
            )
        self.index = json.loads(path.read_text(encoding="utf-8"))
        if self.index.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path}: not a clipforge embedding cache")
        if tower is not None:
            if preprocess is None:
                raise ValueError("EmbeddingCache: checking a tower needs its preprocess spec too")
            fingerprint = tower_fingerprint(tower, preprocess)
        if fingerprint is not None:
            msg = _mismatch(self.index["fingerprint"], dict(fingerprint), self.directory)
            if msg:
                raise CacheMismatchError(
                    msg.replace("weights: cache has", "tower weights: cache has")
                    + "; the cache belongs to another tower or preprocessing: "
                    "rebuild it with `clipforge cache-embeddings`"
                )
        missing = [f for f in self.index["shards"] if not (self.directory / f).is_file()]
        if missing:
            raise ValueError(
                f"{self.directory}: incomplete embedding cache "
                f"({len(missing)} of {len(self.index['shards'])} shards "
                "missing); rerun `clipforge cache-embeddings` with the same arguments to finish it"
            )
        self.num_samples, self.views, self.dim = (
            self.index["num_samples"],
            self.index["views"],
            self.index["dim"],
        )
        self.shard_size = self.index["shard_size"]
        self._shards: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _shard(self, s: int) -> np.ndarray:
        if s not in self._shards:
            self._shards[s] = np.load(self.directory / self.index["shards"][s], mmap_mode="r")
        return self._shards[s]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for a cache of {self.num_samples} samples")
        s, j = divmod(i, self.shard_size)
        return torch.from_numpy(np.array(self._shard(s)[j], dtype=np.float32))

    def get(self, i: int, view: int = 0) -> torch.Tensor:
        return self[i][view]

    def __getstate__(self) -> dict:  # memmaps are reopened in DataLoader workers
        state = dict(self.__dict__)
        state["_shards"] = {}
        return state


class CachedPairs(Dataset):
    """Training pairs with a precomputed image embedding: {"image_embedding": (D,), "text": tokens}.

    texts: token ids (N, T), or strings with `tokenizer`. With several views, each access picks one at
    random (torch's global RNG, which the trainer seeds per sample: resumable and reproducible).
    """

    def __init__(self, cache: EmbeddingCache, texts: torch.Tensor | Sequence[str], tokenizer: Any = None,
                 context_length: int | None = None) -> None:  # fmt: skip
        if len(texts) != len(cache):
            raise ValueError(f"the cache holds {len(cache)} images but {len(texts)} texts were given")
        if not isinstance(texts, torch.Tensor) and tokenizer is None:
            raise ValueError("CachedPairs: caption strings need a tokenizer")
        self.cache, self.texts, self.tokenizer, self.context_length = cache, texts, tokenizer, context_length

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        views = self.cache[i]
        v = int(torch.randint(len(views), ())) if len(views) > 1 else 0
        text = self.texts[i]
        if not isinstance(text, torch.Tensor):
            kw = {"context_length": self.context_length, "truncate": True} if self.context_length else {}
            text = self.tokenizer([text], **kw)[0]
        return {"image_embedding": views[v], "text": text}
