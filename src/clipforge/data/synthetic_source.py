"""The built-in synthetic data as a Source: coloured shapes rendered in memory, with evaluation sets of their
own (zero-shot seen / unseen, retrieval). Registered in data/sources.py, importable from there too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from ..transforms import normalise_uint8
from .memory import TensorPairs
from .ordered import Sample, captions_digest
from .skips import SkipCounter, Skipped
from .source_base import CaptionedImages, EvalSet, LabelledImages, Source

SYNTHETIC_TEMPLATES = ["a {}.", "a photo of a {}.", "there is a {}."]


class SyntheticSource(Source):
    """The built-in coloured shapes (data/synthetic.py), rendered in memory at `image_size`; its held-out
    colour-shape combinations give zero-shot sets (seen / unseen) and a retrieval set."""

    kind = "synthetic"

    @dataclass(frozen=True)
    class Options:
        image_size: int
        seed: int = 0
        synthetic_train: int = 20000  # images (the names of the experiment's data fields)
        synthetic_val: int = 512

    def __init__(self, opts: Options, skips: SkipCounter | None = None) -> None:
        from .synthetic import ShapesConfig, classification_set, make_tensors

        self.opts = opts
        shapes = ShapesConfig(image_size=opts.image_size, seed=opts.seed)
        self.images, self._captions = make_tensors(shapes, opts.synthetic_train, "train")
        per_class = max(1, opts.synthetic_val // len(shapes.colours) // len(shapes.shapes))
        self._sets = {
            name: classification_set(shapes, per_class, split, classes="all")
            for name, split in (("seen", "seen_eval"), ("unseen", "unseen"))
        }
        self._retrieval = make_tensors(shapes, opts.synthetic_val, "seen_eval")

    def captions(self, progress: bool = True) -> list[str]:
        return list(self._captions)

    def dataset(self, transform: Callable, tokenizer: Callable, context_length: int) -> Dataset:
        # pre-rendered uint8 images; the whole caption list is tokenised at once (fast)
        return TensorPairs(
            self.images, tokenizer(self._captions, context_length=context_length, truncate=True)
        )

    def eval_sets(self) -> dict[str, EvalSet]:
        sets: dict[str, EvalSet] = {}
        for name, (x, y, classnames) in self._sets.items():
            sets[f"zeroshot_{name}"] = LabelledImages(normalise_uint8(x), y, classnames, SYNTHETIC_TEMPLATES)
        x, caps = self._retrieval
        sets["retrieval"] = CaptionedImages(normalise_uint8(x), caps, torch.arange(len(caps)))
        return sets

    def identity(self) -> str:
        return f"synthetic:{self.opts.seed}:{self.opts.synthetic_train}"

    def samples(self, start: int = 0) -> Iterator[Sample | Skipped]:
        for i in range(start, len(self.images)):
            yield Sample(self.images[i], (self._captions[i],), f"synthetic:{i}")

    def fingerprint(self) -> dict[str, Any]:
        o = self.opts
        return {
            "kind": "synthetic",
            "path": self.identity(),
            "files": f"seed={o.seed} image_size={o.image_size}",
            "samples": o.synthetic_train,
            "captions": captions_digest([c] for c in self._captions),
        }
