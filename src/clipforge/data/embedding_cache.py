"""Precomputed image embeddings of a locked tower (LiT, Zhai et al. 2022, Table 7): the read side.

A locked image tower gives the same embedding for the same input at every step, so it runs once
(`data/cache_writer.py`, `clipforge cache-embeddings`) and training reads what it wrote:

    cache = EmbeddingCache("cache/", tower=tower, preprocess=spec)   # refuses another tower's cache
    pairs = CachedCaptionPairs(cache, cache.captions(), tokenizer, 77)
    # training batches then hold {"image_embedding": (B, D), "text": (B, T)}: the tower never runs

The shards are numpy arrays (n, views, dim) opened memory-mapped (np.load(mmap_mode="r")), so a cache
larger than memory costs only what a batch touches. See cache_writer.py for the directory layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

CACHE_FORMAT = "clipforge-embeddings"
INDEX_FILE = "index.json"
CAPTIONS_FILE = "captions.jsonl"  # every cached sample's captions, one JSON list per line, in row order
SKIP_LOG = "skipped.log"  # every sample the writer skipped: reason<TAB>file or shard:key


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


def _differences(found: Any, expected: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, found, expected) of every differing leaf: nested settings are compared field by field,
    so the message names `fingerprint.weights`, not two whole fingerprint dicts."""
    if isinstance(found, Mapping) and isinstance(expected, Mapping):
        out = []
        for k in sorted(set(found) | set(expected)):
            out += _differences(found.get(k), expected.get(k), f"{key}.{k}" if key else str(k))
        return out
    return [] if found == expected else [(key, found, expected)]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]  # hashes, file lists


def _mismatch(found: Mapping[str, Any], expected: Mapping[str, Any], where: Path) -> str | None:
    diffs = _differences(found, expected)
    if not diffs:
        return None
    parts = [f"{k}: cache has {_short(f)}, expected {_short(e)}" for k, f, e in diffs]
    return f"{where}: the embedding cache was made differently ({'; '.join(parts)})"


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
        if not self.index.get("complete", False):
            raise ValueError(
                f"{self.directory}: incomplete embedding cache (the writer did not finish); rerun "
                "`clipforge cache-embeddings` with the same arguments to finish it"
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

    @property
    def source(self) -> dict[str, Any] | None:
        """The fingerprint of the source the cache was made from (None: made from a Dataset)."""
        return self.index.get("source")

    def captions(self) -> list[list[str]]:
        """Every cached sample's captions in row order, checked against the index's hash."""
        from .ordered import captions_digest

        path = self.directory / CAPTIONS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the cache holds no captions (made from a Dataset or by an older clipforge); "
                "rebuild it with `clipforge cache-embeddings`"
            )
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        if len(rows) != self.num_samples or captions_digest(rows) != self.index.get("captions_sha256"):
            raise ValueError(
                f"{path}: {len(rows)} caption rows that do not match index.json "
                f"({self.num_samples} samples, captions_sha256); rebuild the cache"
            )
        return rows

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


class CachedCaptionPairs(Dataset):
    """The cache with its own captions: {"image_embedding": (D,), "text": tokens}. Each access picks one
    view and then one of the sample's captions from torch's global RNG, which BatchStream seeds per
    (epoch, sample): the same batches at any world size, and after a resume."""

    def __init__(self, cache: EmbeddingCache, captions: Sequence[Sequence[str]], tokenizer: Any,
                 context_length: int) -> None:  # fmt: skip
        if len(captions) != len(cache):
            raise ValueError(f"the cache holds {len(cache)} images but {len(captions)} caption lists")
        flat = [c for row in captions for c in row]
        self.tokens = tokenizer(flat, context_length=context_length, truncate=True)  # (total captions, T)
        self.offsets = [0]
        for row in captions:
            self.offsets.append(self.offsets[-1] + len(row))
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        views = self.cache[i]
        v = int(torch.randint(len(views), ())) if len(views) > 1 else 0
        lo, hi = self.offsets[i], self.offsets[i + 1]
        c = lo + int(torch.randint(hi - lo, ())) if hi - lo > 1 else lo
        return {"image_embedding": views[v], "text": self.tokens[c]}
