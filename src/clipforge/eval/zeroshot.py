"""Zero-shot classification (CLIP paper, Sec. 3.1): class names in prompt templates, averaged text features.

For each class every template is encoded, each text feature L2-normalised, the mean taken and
renormalised; images are classified by cosine similarity (argmax) against these class weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .features import encode_images, encode_texts
from .templates import as_texts, format_template


@torch.no_grad()
def zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """(D, C) unit-norm class weights: normalise each template's feature, average, renormalise."""
    classnames = as_texts(classnames, "classnames", single=False)
    templates = as_texts(templates, "templates")
    if not classnames:
        raise ValueError("no class names")
    if not templates:
        raise ValueError("no templates")
    texts = [format_template(t, c) for c in classnames for t in templates]  # class-major
    feats = encode_texts(model, tokenizer, texts, batch_size, device, normalize=True, progress=progress)
    feats = feats.view(len(classnames), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(feats, dim=-1).T.contiguous()


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 and mean per-class recall (= sklearn's balanced accuracy, over the classes present in
    `labels`) from (N, C) scores. With fewer than 5 classes acc5 is NaN, as CLIP_benchmark reports it:
    a top-5 over 4 classes would be 100% whatever the model does."""
    labels = labels.to(logits.device).long()
    if len(labels) != len(logits):
        raise ValueError(f"{len(logits)} score rows but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("no samples to score")
    pred = logits.argmax(dim=1)
    present = labels.unique()
    recalls = torch.stack([(pred[labels == c] == c).double().mean() for c in present])
    return {
        "acc1": _topk_correct(logits, labels, 1).double().mean().item(),
        "acc5": _topk_correct(logits, labels, 5).double().mean().item() if logits.shape[1] >= 5 else math.nan,
        "mean_per_class_recall": recalls.mean().item(),
    }


def zero_shot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(N, C) cosine similarities of (renormalised) image features and (D, C) class weights."""
    return F.normalize(image_features.float(), dim=-1) @ classifier.to(image_features.device).float()


def zero_shot_metrics(
    image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor
) -> dict[str, float]:
    """{"acc1", "acc5", "mean_per_class_recall"} of cosine-logit zero-shot classification."""
    return classification_metrics(zero_shot_logits(image_features, classifier), labels)


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts, rows = true class, columns = predicted class."""
    idx = labels.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_recall(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(C,) recall of every class (NaN for a class with no samples)."""
    cm = confusion_matrix(logits.argmax(1).cpu(), labels.cpu(), logits.shape[1]).double()
    return cm.diag() / cm.sum(1)


class ZeroShotEvaluator:
    """big_vision-style evaluator: fixed data and prompts, `run(model, tokenizer) -> metrics`.

    `images` is an image tensor (N, 3, S, S) with `labels`, or a Dataset / DataLoader whose items carry
    labels. Image features are recomputed on every run (the image tower may be training).
    """

    def __init__(
        self,
        classnames: Sequence[str],
        templates: Sequence[str],
        images,
        labels: torch.Tensor | Sequence[int] | None = None,
        batch_size: int = 256,
        prefix: str = "",
    ) -> None:
        self.classnames, self.templates = list(classnames), list(templates)
        self.images, self.batch_size, self.prefix = images, batch_size, prefix
        self.labels = None if labels is None else torch.as_tensor(labels).long()
        if isinstance(images, torch.Tensor) and self.labels is None:
            raise ValueError("ZeroShotEvaluator: an image tensor needs `labels`")

    def run(self, model: torch.nn.Module, tokenizer, device=None) -> dict[str, float]:
        classifier = zero_shot_classifier(
            model, tokenizer, self.classnames, self.templates, self.batch_size, device
        )
        feats, labels = encode_images(model, self.images, self.batch_size, device)
        labels = self.labels if self.labels is not None else labels
        if labels is None:
            raise ValueError("ZeroShotEvaluator: the data carries no labels and none were given")
        metrics = zero_shot_metrics(feats, labels, classifier.cpu())
        return {f"{self.prefix}{k}": v for k, v in metrics.items()}
