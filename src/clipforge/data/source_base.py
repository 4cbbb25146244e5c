"""The Source contract every kind of training data implements, and the evaluation inputs a source may carry.

The kinds (data/sources.py, data/synthetic_source.py) subclass `Source`; data/sources.py collects them in
its registry and re-exports these names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset

from .ordered import Sample
from .skips import SkipCounter, Skipped
from .streams import BatchStream, IterableBatchStream


# ------------------------------------------------------------------------------------------ evaluation inputs
@dataclass(frozen=True)
class LabelledImages:
    """Zero-shot classification input: images (normalised tensor (N, 3, S, S) or a Dataset of {"image",
    "label"}), labels (None when the dataset carries them), class names and prompt templates."""

    images: Any
    labels: torch.Tensor | None
    classnames: list[str]
    templates: list[str]


@dataclass(frozen=True)
class CaptionedImages:
    """Retrieval input: images (tensor or Dataset, in image order) and their captions (a flat list with
    `text_to_image`, or one list of captions per image)."""

    images: Any
    captions: list[str] | list[list[str]]
    text_to_image: torch.Tensor | None = None


EvalSet = LabelledImages | CaptionedImages


@dataclass(frozen=True)
class StreamOptions:
    """How batches are drawn: batch_size is the global batch; with several processes each loads its share."""

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    workers: int = 0
    pin_memory: bool = False
    rank: int = 0
    world_size: int = 1


# ------------------------------------------------------------------------------------------ the contract
class Source:
    """The interface every data kind implements. Map-style kinds inherit `stream`; streams override it."""

    kind: ClassVar[str]
    skips: SkipCounter | None = None  # counts bad samples by reason (None: the kind cannot have any)

    def captions(self, progress: bool = True) -> list[str]:
        """Every training caption, in sample order (a BPE corpus; the text side of an embedding cache).
        `progress=False` silences a progress bar where reading them takes one (shards)."""
        raise NotImplementedError

    def dataset(self, transform: Callable, tokenizer: Callable, context_length: int) -> Dataset:
        """{"image": tensor, "text": token ids} items (an IterableDataset for streaming kinds)."""
        raise NotImplementedError

    def stream(self, data: Dataset, opts: StreamOptions) -> BatchStream | IterableBatchStream:
        """Endless, resumable batches of `data` (rows of the global batches for this rank)."""
        return BatchStream(
            data,
            opts.batch_size,
            seed=opts.seed,
            shuffle=opts.shuffle,
            workers=opts.workers,
            pin_memory=opts.pin_memory,
            rank=opts.rank,
            world_size=opts.world_size,
        )

    def eval_sets(self) -> dict[str, EvalSet]:
        """Evaluation inputs that come with the data itself (none for files: see data.val)."""
        return {}

    def identity(self) -> str:
        """What the data is, in words (a path, a pattern, the synthetic seed and size)."""
        raise NotImplementedError

    def samples(self, start: int = 0) -> Iterator[Sample | Skipped]:
        """Every sample with all its captions in one fixed order (no shuffle, no rank split), unreadable
        ones as Skipped, from position `start` (positions count both; see data/ordered.py)."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What the data is by content: kind, files (paths, sizes, mtimes), listed samples, captions."""
        raise NotImplementedError
