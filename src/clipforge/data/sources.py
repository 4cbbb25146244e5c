"""Where training pairs come from: one class per data kind behind one small interface (the Source contract).

    source = SOURCES["manifest"](ManifestSource.Options(train="pairs.csv"))   # or open_source(kind, opts)
    texts = source.captions()                        # every caption (e.g. to learn a BPE vocabulary)
    data = source.dataset(transform, tokenizer, 77)  # {"image", "text"} items (map-style or a stream)
    stream = source.stream(data, StreamOptions(batch_size=64, seed=0))   # resumable batches
    source.eval_sets()                               # built-in evaluation inputs (the synthetic set's)
    source.samples(start)                            # every sample in a fixed order (the cache writer)
    source.fingerprint()                             # what the data is, by content (caches record it)

The trainer, the embedding-cache writer and evaluation take any Source; adding a data kind means one class
here (or in a module of its own, as data/synthetic_source.py) and one entry in SOURCES. The contract and the
evaluation-input types are in data/source_base.py; every name stays importable from here. Data code
receives the fields it needs (an `Options` dataclass per kind), never the whole experiment. Bad samples
are counted by reason in `source.skips` (see data/skips.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from .embedding_cache import CachedCaptionPairs, CacheMismatchError, EmbeddingCache, weights_hash
from .ordered import (
    Sample,
    fingerprint_diff,
    pair_samples,
    pairs_fingerprint,
    shard_samples,
    shards_fingerprint,
)
from .pairs import PairDataset, open_pairs
from .shard_split import DistributedWebDataset, check_shard_split
from .skips import SkipCounter, Skipped
from .source_base import CaptionedImages, EvalSet, LabelledImages, Source, StreamOptions
from .streams import IterableBatchStream, SeededTransformStream
from .synthetic_source import SYNTHETIC_TEMPLATES, SyntheticSource
from .wds import shard_captions

__all__ = [  # the contract (data/source_base.py) and the synthetic kind stay importable from here
    "SOURCES",
    "SYNTHETIC_TEMPLATES",
    "CaptionedImages",
    "EmbeddingCacheSource",
    "EvalSet",
    "FileOptions",
    "FolderSource",
    "LabelledImages",
    "ManifestSource",
    "Source",
    "StreamOptions",
    "SyntheticSource",
    "WebDatasetSource",
    "infer_kind",
    "kinds",
    "open_source",
    "source_options",
]


# ------------------------------------------------------------------------------------------ kinds
@dataclass(frozen=True)
class FileOptions:
    """A manifest (CSV/TSV/JSONL) or an image folder with sidecar captions."""

    train: str
    image_key: str = "image"
    caption_key: str = "caption"
    caption_sep: str | None = "||"
    root: str | None = None


class _PairsSource(Source):
    """Map-style pairs from files: a bad image is counted and replaced by the next readable one."""

    def __init__(self, pairs: PairDataset, path: str, base: Path) -> None:
        self.pairs, self.path, self.base = pairs, path, base
        self.skips = pairs.skips

    def captions(self, progress: bool = True) -> list[str]:
        return self.pairs.captions()

    def dataset(self, transform: Callable, tokenizer: Callable, context_length: int) -> Dataset:
        self.pairs.transform, self.pairs.tokenizer, self.pairs.context_length = (
            transform,
            tokenizer,
            context_length,
        )
        return self.pairs

    def identity(self) -> str:
        return self.path

    def samples(self, start: int = 0) -> Iterator[Sample | Skipped]:
        return pair_samples(self.pairs, start)

    def fingerprint(self) -> dict[str, Any]:
        return pairs_fingerprint(self.kind, self.pairs, Path(self.path), self.base)


class ManifestSource(_PairsSource):
    kind = "manifest"
    Options = FileOptions

    def __init__(self, opts: FileOptions, skips: SkipCounter | None = None) -> None:
        p = Path(opts.train)
        if p.is_dir():
            raise ValueError(f"data.train: {p} is a folder; use data.kind=folder, or give a manifest file")
        # seed=None: caption choice from the global RNG, which BatchStream seeds per (epoch, sample)
        pairs = open_pairs(
            p,
            retry=True,
            image_key=opts.image_key,
            caption_key=opts.caption_key,
            sep=opts.caption_sep,
            root=opts.root,
            skips=skips,
        )
        super().__init__(pairs, str(p), Path(opts.root) if opts.root is not None else p.parent)


class FolderSource(_PairsSource):
    kind = "folder"
    Options = FileOptions

    def __init__(self, opts: FileOptions, skips: SkipCounter | None = None) -> None:
        p = Path(opts.train)
        if not p.is_dir():
            raise FileNotFoundError(f"data.train: image folder not found: {p}")
        super().__init__(open_pairs(p, retry=True, skips=skips), str(p), p)


class WebDatasetSource(Source):
    """WebDataset tar shards, streamed: split over ranks and workers (`split`), a seeded shuffle buffer,
    augmentation seeded by position (resumable)."""

    kind = "webdataset"

    @dataclass(frozen=True)
    class Options:
        train: str
        seed: int = 0
        caption_key: str = "caption"
        shuffle: bool = True
        shuffle_buffer: int = 1000
        split: str = "epoch"

    def __init__(self, opts: Options, skips: SkipCounter | None = None) -> None:
        self.opts = opts
        self.pairs = DistributedWebDataset(
            opts.train,
            split=opts.split,
            shuffle_buffer=opts.shuffle_buffer if opts.shuffle else 0,
            shuffle_shards=opts.shuffle,
            seed=opts.seed,
            caption_key=opts.caption_key,
        )
        if skips is not None:
            self.pairs.skips = skips
        self.skips = self.pairs.skips

    def captions(self, progress: bool = True) -> list[str]:
        return shard_captions(self.pairs.urls, self.opts.caption_key, progress=progress)

    def dataset(self, transform: Callable, tokenizer: Callable, context_length: int) -> IterableDataset:
        self.pairs.tokenizer, self.pairs.context_length = tokenizer, context_length
        return SeededTransformStream(self.pairs, transform, self.opts.seed)

    def stream(self, data: Dataset, opts: StreamOptions) -> IterableBatchStream:
        """Each rank reads batch_size / world_size pairs from its own shards."""
        if self.opts.split == "epoch":  # a rank without shards would hang the job: stop every rank now
            check_shard_split(len(self.pairs.urls), opts.world_size)
        return IterableBatchStream(
            data, opts.batch_size // opts.world_size, workers=opts.workers, pin_memory=opts.pin_memory
        )

    def identity(self) -> str:
        return self.opts.train

    def samples(self, start: int = 0) -> Iterator[Sample | Skipped]:
        return shard_samples(self.pairs.urls, self.opts.caption_key, start)  # listed order, not shuffled

    def fingerprint(self) -> dict[str, Any]:
        return shards_fingerprint(self.opts.train, self.pairs.urls)


class EmbeddingCacheSource(Source):
    """A locked image tower's precomputed embeddings (`clipforge cache-embeddings`) with the captions stored
    in the cache: items {"image_embedding", "text"}; the image tower never runs and the data files the
    cache was made from are not read. `made_from`: the data the run names, checked against the cache's
    record of its source (and giving the run its evaluation sets)."""

    kind = "embedding_cache"

    def __init__(self, cache_dir: str | Path, made_from: Source | None = None) -> None:
        self.cache = EmbeddingCache(cache_dir)
        self.where, self.made_from = str(cache_dir), made_from
        self._captions = self.cache.captions()

    @classmethod
    def open(cls, cache_dir: str | Path, kind: str, fields: dict[str, Any]) -> EmbeddingCacheSource:
        """The cache of an experiment's data section: with `data.train`, or synthetic settings for a cache
        of the synthetic set, that source is opened to check the cache against (no image is read);
        with neither (the default data.kind and a cache of files) the cache stands alone."""
        cache = EmbeddingCache(cache_dir)
        made_kind = (cache.source or {}).get("kind")
        if fields.get("train") or (kind == "synthetic" and made_kind == "synthetic"):
            return cls(cache_dir, made_from=open_source(kind, fields))
        return cls(cache_dir)

    def check(self, tower: torch.nn.Module, tower_name: str | None = None) -> None:
        """Refuse a cache made by another tower or from other data (CacheMismatchError: what differs)."""
        made = self.cache.index["fingerprint"]
        if made.get("weights") != weights_hash(tower):
            raise CacheMismatchError(
                f"{self.where}: made by another image tower than model.image_tower={tower_name} (the "
                "weights differ); rebuild it with `clipforge cache-embeddings --tower <that tower>`"
            )
        if self.made_from is None:
            return
        cached, current = self.cache.source or {}, self.made_from.fingerprint()
        diffs = fingerprint_diff(cached, current)
        if diffs:
            raise CacheMismatchError(
                f"{self.where}: made from {cached.get('kind')} {cached.get('path')!r} but the training "
                f"data is {current['kind']} {current['path']!r}: {'; '.join(diffs)}; rebuild it with "
                "`clipforge cache-embeddings` from that data, or leave data.train unset to train from "
                "the cache alone"
            )

    def captions(self, progress: bool = True) -> list[str]:
        return [c for row in self._captions for c in row]

    def dataset(self, transform: Callable, tokenizer: Callable, context_length: int) -> Dataset:
        return CachedCaptionPairs(self.cache, self._captions, tokenizer, context_length)

    def eval_sets(self) -> dict[str, EvalSet]:
        return self.made_from.eval_sets() if self.made_from is not None else {}

    def identity(self) -> str:
        return f"{self.where} <- {(self.cache.source or {}).get('path')}"

    def fingerprint(self) -> dict[str, Any]:
        return dict(self.cache.source or {})


# ------------------------------------------------------------------------------------------ registry
SOURCES: dict[str, type[Source]] = {
    "synthetic": SyntheticSource,
    "manifest": ManifestSource,
    "folder": FolderSource,
    "webdataset": WebDatasetSource,
}


def source_options(kind: str, fields: dict[str, Any]) -> Any:
    """The Options of `kind` filled from `fields` (e.g. the experiment's data section as a dict plus seed
    and image_size); fields a kind does not take are ignored, so one data section serves every kind."""
    if kind not in SOURCES:
        raise ValueError(f"unknown data kind {kind!r}; one of {', '.join(SOURCES)}")
    opts_cls = SOURCES[kind].Options  # type: ignore[attr-defined]
    names = {f.name for f in dataclasses.fields(opts_cls)}
    return opts_cls(**{k: v for k, v in fields.items() if k in names})


def open_source(kind: str, fields: dict[str, Any], skips: SkipCounter | None = None) -> Source:
    """The Source of `kind` from the data section's fields; `skips` receives what listing drops."""
    return SOURCES[kind](source_options(kind, fields), skips=skips)  # type: ignore[call-arg]


def infer_kind(data: str) -> str:
    """'synthetic'; shards (a .tar, a brace pattern, a `::` list, a folder holding only .tar files); an
    image folder; else a manifest file."""
    if data == "synthetic":
        return "synthetic"
    p = Path(data)
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file()]
        tars = [f for f in files if f.suffix == ".tar"]
        return (
            "webdataset" if tars and len(tars) == len([f for f in files if f.suffix != ".json"]) else "folder"
        )
    if data.endswith(".tar") or "{" in data or "::" in data:
        return "webdataset"
    return "manifest"


def kinds() -> Sequence[str]:
    return tuple(SOURCES)
