"""Batched feature extraction (progress bar, DataLoader) and an on-disk cache keyed by model + dataset.

Inputs accepted everywhere in eval/: a tensor of images (N, 3, S, S), a torch Dataset (items are
dicts with "image" [+ "label"], or (image, label) tuples), or an iterable of such batches (a DataLoader).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..files import atomic_file
from .templates import as_texts


def model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch as (images, labels or None), from a tensor, a dict or a tuple. Dict items marked
    valid=False (an unreadable image, counted by its dataset) are dropped with their labels."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        if "image" not in batch:
            raise KeyError(f"batch dict has no 'image' key (keys: {sorted(batch)})")
        x, y = batch["image"], batch.get("label")
        if "valid" in batch:
            keep = torch.as_tensor(batch["valid"], dtype=torch.bool)
            x, y = x[keep], (torch.as_tensor(y)[keep] if y is not None else None)
        return x, y
    if isinstance(batch, list | tuple) and len(batch) >= 1:
        labels = batch[1] if len(batch) > 1 else None
        return batch[0], (torch.as_tensor(labels) if labels is not None else None)
    raise TypeError(f"cannot read images from a batch of type {type(batch).__name__}")


def image_batches(images, batch_size: int = 256, num_workers: int = 0) -> Iterable:
    """Normalise the accepted inputs to an iterable of batches."""
    if isinstance(images, torch.Tensor):
        return (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    if isinstance(images, Dataset) and not isinstance(images, torch.utils.data.IterableDataset):
        return DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return images


@torch.no_grad()
def encode_images(
    model: torch.nn.Module,
    images,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    normalize: bool = True,
    progress: bool = False,
    num_workers: int = 0,
    desc: str = "image features",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, D) float32 CPU image features (unit norm unless normalize=False), and labels if any."""
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        batches = image_batches(images, batch_size, num_workers)
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
            x, y = _split_batch(batch)
            if not len(x):  # every image of the batch was unreadable
                continue
            f = model.encode_image(x.to(device, non_blocking=True)).float()
            feats.append((F.normalize(f, dim=-1) if normalize else f).cpu())
            if y is not None:
                labels.append(torch.as_tensor(y).long().cpu())
    finally:
        model.train(was_training)
    skips = getattr(images, "skips", None)
    if skips is not None and skips.total and hasattr(skips, "summary"):
        tqdm.write(skips.summary())  # once per pass, with the files named
    if not feats:
        raise ValueError("no images to encode (empty dataset or none readable)")
    if labels and len(labels) != len(feats):
        raise ValueError("some batches carry labels and others do not")
    return torch.cat(feats), (torch.cat(labels) if labels else None)


def tokenize(tokenizer, texts: Sequence[str], context_length: int | None = None) -> torch.Tensor:
    """Call a clipforge Tokenizer (truncating to the model's context) or any callable texts -> ids."""
    try:
        return tokenizer(list(texts), context_length=context_length, truncate=True)
    except TypeError:  # a plain callable without those keywords
        return tokenizer(list(texts))


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str] | torch.Tensor,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    normalize: bool = True,
    progress: bool = False,
    desc: str = "text features",
) -> torch.Tensor:
    """(M, D) float32 text features on CPU; `texts` are strings (any iterable; one str is one text) or
    already-tokenized ids (M, T)."""
    if not isinstance(texts, torch.Tensor):
        texts = as_texts(texts)
    device = torch.device(device) if device is not None else model_device(model)
    ctx = getattr(getattr(getattr(model, "config", None), "text", None), "context_length", None)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = texts[i : i + batch_size]
            ids = chunk if isinstance(chunk, torch.Tensor) else tokenize(tokenizer, chunk, ctx)
            f = model.encode_text(ids.to(device)).float()
            out.append((F.normalize(f, dim=-1) if normalize else f).cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("no texts to encode")
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ on-disk cache
def model_fingerprint(model: torch.nn.Module | dict, samples_per_tensor: int = 64) -> str:
    """A hash of the state dict's names/shapes/dtypes plus a strided sample of every tensor's values.

    Cheap for big models, yet any training step (which moves almost every tensor) changes it.
    """
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else model
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name]
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::step][:samples_per_tensor].to("cpu", torch.float64)
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:20]


def dataset_key(*parts) -> str:
    """Hash of whatever identifies the data: path, split, transform spec (dicts/objects via JSON or repr)."""
    blob = json.dumps([p if isinstance(p, str | int | float | type(None)) else repr(p) for p in parts])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_image_features(
    model: torch.nn.Module,
    images,
    cache_dir: str | Path | None,
    key: Sequence,
    fingerprint: str | None = None,
    **encode_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`encode_images` with results stored as safetensors under cache_dir/<model>-<data>.safetensors."""
    if cache_dir is None:
        return encode_images(model, images, **encode_kwargs)
    from safetensors.torch import load_file, save_file

    fingerprint = fingerprint or model_fingerprint(model)
    norm = encode_kwargs.get("normalize", True)
    path = Path(cache_dir) / f"{fingerprint}-{dataset_key(*key, norm)}.safetensors"
    if path.exists():
        d = load_file(str(path))
        return d["features"], d.get("labels")
    feats, labels = encode_images(model, images, **encode_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"features": feats.contiguous()}
    if labels is not None:
        tensors["labels"] = labels.contiguous()
    meta = {"model": fingerprint, "key": json.dumps([repr(k) for k in key])}
    atomic_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))  # never half an entry
    return feats, labels
