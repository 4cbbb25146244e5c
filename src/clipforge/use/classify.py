"""Zero-shot classification of image files with your own labels, and CLIPScore of image-caption pairs.

    clf = Classifier(encoder, ["a cat", "a dog"], templates=["a photo of {}."])   # labels embedded once
    clf.classify(["x.jpg", "y.png"], top_k=2)   # [{"path", "labels": [...], "scores": [...]}, ...]
    clip_score(encoder, ["x.jpg"], ["a cat on a mat"])

Unlike HF's zero-shot pipeline (every label re-encoded for every image, one image per forward), the
label embeddings are computed once per Classifier and images go through the model in batches, decoded
by DataLoader workers. Probabilities: softmax over labels of logit_scale * cosine for CLIP models;
independent sigmoid(logit_scale * cosine + logit_bias) for sigmoid-loss (SigLIP-style) models.
Several templates per label are averaged as in the CLIP paper (normalise each, mean, renormalise).
CLIPScore (Hessel et al. 2021): w * max(cos, 0) with w = 2.5, and torchmetrics' 100 * max(cos, 0).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..eval.templates import as_texts, format_template
from .encoders import Encoder
from .inputs import Item, ItemImages, collate_rows

CLIPSCORE_W = 2.5


def label_embeddings(
    encoder: Encoder, labels: Sequence[str], templates: Sequence[str] = ("{}",)
) -> torch.Tensor:
    """(C, D) unit label vectors: each label in every template, normalised, averaged, renormalised."""
    labels, templates = as_texts(labels, "labels", single=False), as_texts(templates, "templates")
    if not labels:
        raise ValueError("no labels given")
    if not templates:
        raise ValueError("no templates given")
    texts = [format_template(t, label) for label in labels for t in templates]  # label-major
    feats = encoder.encode_texts(texts).view(len(labels), len(templates), -1).mean(dim=1)
    return F.normalize(feats, dim=-1)


def as_paths(images: str | os.PathLike | Iterable[str | os.PathLike], what: str = "images") -> list[str]:
    """Image file paths as str, from one path or any iterable of paths (str or Path). Anything else (a
    PIL image, an array) is refused: it would be looked up as a file named after its repr and skipped."""
    if isinstance(images, str | os.PathLike):
        return [os.fspath(images)]
    out = []
    for i, p in enumerate(images):
        if not isinstance(p, str | os.PathLike):
            raise TypeError(
                f"{what}[{i}] is a {type(p).__name__}: give image file paths (str or Path); for images in "
                "memory use encoder.encode_pixels(torch.stack([encoder.preprocess(im) for im in images]))"
            )
        out.append(os.fspath(p))
    return out


def image_batches(
    encoder: Encoder, paths: str | Path | Iterable[str | Path], batch_size: int = 32, workers: int = 0
) -> Iterator[tuple[list[str], torch.Tensor | None, list]]:
    """(paths, (n, D) unit image features, skipped (key, Skipped)) per batch of readable images."""
    items = [Item(p, p) for p in as_paths(paths)]
    loader = DataLoader(
        ItemImages(items, encoder.preprocess),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_rows,
    )
    for batch in loader:
        feats = encoder.encode_pixels(batch["pixels"]) if batch["key"] else None
        yield batch["key"], feats, batch["skipped"]


def label_probabilities(
    encoder: Encoder, image_features: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """(N, C) probabilities of (N, D) unit image features over (C, D) unit label vectors: softmax of the
    scaled cosines (CLIP), or independent sigmoids with the model's bias (SigLIP-style)."""
    logits = encoder.logit_scale * image_features @ weights.T
    if encoder.sigmoid:
        return torch.sigmoid(logits + encoder.logit_bias)
    return logits.softmax(dim=-1)


class Classifier:
    """Zero-shot labels for image files: `Classifier(encoder, ["a cat", "a dog"]).classify(paths)`."""

    def __init__(
        self, encoder: Encoder, labels: Iterable[str], templates: str | Iterable[str] = ("{}",)
    ) -> None:
        self.encoder, self.labels = encoder, as_texts(labels, "labels", single=False)
        self.weights = label_embeddings(encoder, self.labels, templates)  # (C, D), computed once

    def probabilities(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, C) label probabilities of unit image features."""
        return label_probabilities(self.encoder, image_features, self.weights)

    def classify(
        self, paths: str | Path | Iterable[str | Path], top_k: int = 5, batch_size: int = 32, workers: int = 0
    ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """(one result per readable image, in input order: path, top-k labels and probabilities;
        the skipped images with reason and detail)."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        k = min(top_k, len(self.labels))
        results, skipped = [], []
        for keys, feats, bad in image_batches(self.encoder, paths, batch_size, workers):
            skipped += [{"path": key, "reason": s.reason, "detail": s.detail} for key, s in bad]
            if feats is None:
                continue
            p, idx = self.probabilities(feats).topk(k, dim=-1)
            for key, row_p, row_i in zip(keys, p.tolist(), idx.tolist()):
                results.append(
                    {
                        "path": key,
                        "labels": [self.labels[i] for i in row_i],
                        "scores": [round(x, 6) for x in row_p],
                    }
                )
        return results, skipped


def clip_score(
    encoder: Encoder,
    images: str | Path | Iterable[str | Path],
    captions: str | Iterable[str],
    batch_size: int = 32,
    workers: int = 0,
    w: float = CLIPSCORE_W,
) -> dict[str, Any]:
    """CLIPScore per (image, caption) pair and the means over the readable pairs."""
    images, captions = as_paths(images), as_texts(captions, "captions")
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: give one caption per image")
    pairs, skipped = [], []
    position = 0  # batches follow the input order: pairs [position, position + batch) are this batch
    for keys, feats, bad in image_batches(encoder, images, batch_size, workers):
        skipped += [{"image": key, "reason": s.reason, "detail": s.detail} for key, s in bad]
        n_batch = len(keys) + len(bad)
        batch_caps = list(captions[position : position + n_batch])
        batch_imgs = [str(p) for p in images[position : position + n_batch]]
        position += n_batch
        if feats is None:
            continue
        bad_keys = {key for key, _ in bad}
        caps = [c for p, c in zip(batch_imgs, batch_caps) if p not in bad_keys]
        text = encoder.encode_texts(caps)
        cos = (feats * text).sum(dim=-1)
        for key, c, v in zip(keys, caps, cos.tolist()):
            pairs.append(
                {
                    "image": key,
                    "caption": c,
                    "cosine": v,
                    "clip_score": w * max(v, 0.0),
                    "clip_score_100": 100 * max(v, 0.0),
                }
            )
    n = max(len(pairs), 1)
    return {
        "pairs": pairs,
        "skipped": skipped,
        "count": len(pairs),
        "clip_score": sum(p["clip_score"] for p in pairs) / n,
        "clip_score_100": sum(p["clip_score_100"] for p in pairs) / n,
        "w": w,
    }
