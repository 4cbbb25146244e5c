"""Supervised pretraining of an image tower (cross entropy), for users without a pretrained tower.

    clf = ImageClassifier(get_config("tiny-vit").vision, embed_dim=64, num_classes=8)
    result = pretrain_image(clf, train_set, steps=500, batch_size=64)
    save_classifier(clf, "runs/pretrain", classnames)

`train_set` items: {"image": (3, S, S), "label": int} (eval.datasets.ImageFolderDataset) or
(image, label). The synthetic shapes set has a labelled mode for this (`synthetic_labelled`): shapes
only, no captions, so a LiT model built on it shares nothing with the caption-based evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from ..models.classifier import ImageClassifier
from ..transforms import normalise_uint8
from .optim import build_optimizer, cosine_schedule


@dataclass
class PretrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    train_accuracy: float = float("nan")  # over the last epoch-worth of batches
    val_accuracy: float | None = None
    seconds: float = 0.0


def _xy(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        x, y = batch["image"], torch.as_tensor(batch["label"])
        if "valid" in batch:  # eval.datasets marks unreadable images (counted there) instead of failing
            keep = torch.as_tensor(batch["valid"], dtype=torch.bool)
            x, y = x[keep], y[keep]
        return x, y
    return batch[0], torch.as_tensor(batch[1])


def synthetic_labelled(
    n_per_class: int, image_size: int = 64, seed: int = 0, label: str = "shape", split: str = "train"
) -> tuple[TensorDataset, list[str]]:
    """The synthetic shapes set in labelled mode: (dataset of (normalised image, label), class names)."""
    from ..data.synthetic import ShapesConfig, classification_set

    images, labels, classnames = classification_set(
        ShapesConfig(image_size=image_size, seed=seed), n_per_class, split, label=label
    )
    return TensorDataset(normalise_uint8(images), labels), classnames


@torch.no_grad()
def folder_labelled(
    root: str, preprocess: Any, val: str | None = None, val_fraction: float = 0.1, seed: int = 0
) -> tuple[Dataset, Dataset | None, list[str]]:
    """(train set with training augmentation, validation set with eval preprocessing, class names) from a
    folder of class folders. Validation: the `val` folder (same classes), else a seeded `val_fraction` of
    each class held out (at least one image of a class with two or more; none when val_fraction is 0)."""
    from torch.utils.data import Subset

    from ..eval.datasets import ImageFolderDataset
    from ..transforms import eval_transform, train_transform

    train = ImageFolderDataset(root, train_transform(preprocess))
    if val is not None:
        held = ImageFolderDataset(val, eval_transform(preprocess))
        if held.folders != train.folders:
            raise ValueError(
                f"--val {val}: class folders {held.folders} differ from {root}'s {train.folders}"
            )
        return train, held, train.classnames
    if val_fraction <= 0:
        return train, None, train.classnames
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(train.samples):
        by_class.setdefault(label, []).append(i)
    held_out: list[int] = []
    for idx in by_class.values():
        k = min(len(idx) - 1, max(1, round(len(idx) * val_fraction))) if len(idx) > 1 else 0
        held_out += [idx[j] for j in torch.randperm(len(idx), generator=g)[:k].tolist()]
    keep = sorted(set(range(len(train))) - set(held_out))
    evaluation = ImageFolderDataset(root, eval_transform(preprocess))
    return Subset(train, keep), Subset(evaluation, sorted(held_out)), train.classnames


def accuracy(model: ImageClassifier, dataset: Dataset, batch_size: int = 256) -> float:
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        x, y = _xy(batch)
        if not len(y):
            continue
        correct += int((model(x.to(device)).argmax(-1).cpu() == y).sum())
        total += len(y)
    model.train(was)
    return correct / max(1, total)


def pretrain_image(
    model: ImageClassifier,
    train_set: Dataset,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_steps: int = 0,
    label_smoothing: float = 0.0,
    seed: int = 0,
    workers: int = 0,
    val_set: Dataset | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Cross-entropy training with AdamW + warm-up cosine (`train.optim`); returns losses and accuracies."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(train_set) < batch_size:
        raise ValueError(
            f"the training set has {len(train_set)} images, fewer than one batch of {batch_size}"
        )
    device = next(model.parameters()).device
    optimizer = build_optimizer(model, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8)
    scheduler = cosine_schedule(optimizer, warmup_steps, steps)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        train_set, batch_size=batch_size, shuffle=True, drop_last=True, generator=g, num_workers=workers
    )
    result, start = PretrainResult(steps=steps), time.perf_counter()
    window = max(1, len(train_set) // batch_size)
    hits: list[tuple[int, int]] = []
    model.train()
    bar = tqdm(total=steps, desc="pretrain-image", disable=not progress, dynamic_ncols=True)
    step = 0
    while step < steps:
        for batch in loader:
            x, y = _xy(batch)
            if not len(y):  # every image of the batch was unreadable (counted by the dataset)
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite loss at step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            result.losses.append(loss.item())
            hits = [*hits, (int((logits.argmax(-1) == y).sum()), len(y))][-window:]
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step >= steps:
                break
    bar.close()
    result.train_accuracy = sum(h for h, _ in hits) / sum(n for _, n in hits)
    if val_set is not None:
        result.val_accuracy = accuracy(model, val_set)
    result.seconds = time.perf_counter() - start
    return result
