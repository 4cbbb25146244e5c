"""Zero-shot classification for every Figure 2 objective: cosine similarity for contrastive models, the
class prompt's score for predictive ones (a captioner's log-likelihood, a BoW predictor's summed
log-probabilities; clipforge.models.predictive). Several templates: the scores are averaged over them
(for the contrastive model, the usual normalise-average-renormalise of the text features)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .features import encode_images, model_device, tokenize
from .templates import format_template
from .zeroshot import classification_metrics, zero_shot_classifier, zero_shot_logits


@torch.no_grad()
def objective_zero_shot_logits(
    model: torch.nn.Module,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    images: torch.Tensor,
    batch_size: int = 128,
    context_length: int | None = None,
) -> torch.Tensor:
    """(N, C) class scores of normalised images (N, 3, S, S) for a CLIP or a predictive model."""
    if not hasattr(model, "class_scores"):
        clf = zero_shot_classifier(model, tokenizer, classnames, templates, batch_size)
        feats, _ = encode_images(model, images, batch_size)
        return zero_shot_logits(feats, clf)
    device = model_device(model)
    prompts = [format_template(t, c) for c in classnames for t in templates]  # class-major
    ids = tokenize(tokenizer, prompts, context_length).to(device)
    was_training = model.training
    model.eval()
    try:
        out = [
            model.class_scores(images[i : i + batch_size].to(device), ids).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out).view(len(images), len(classnames), len(templates)).mean(dim=-1)


class ObjectiveZeroShotEvaluator:
    """`run(model, tokenizer) -> {"acc1", "acc5", "mean_per_class_recall"}` for any Figure 2 model."""

    def __init__(
        self,
        classnames: Sequence[str],
        templates: Sequence[str],
        images: torch.Tensor,
        labels: torch.Tensor,
        context_length: int | None = None,
        batch_size: int = 128,
    ) -> None:
        self.classnames, self.templates = list(classnames), list(templates)
        self.images, self.labels = images, torch.as_tensor(labels).long()
        self.context_length, self.batch_size = context_length, batch_size

    def run(self, model: torch.nn.Module, tokenizer) -> dict[str, float]:
        logits = objective_zero_shot_logits(
            model,
            tokenizer,
            self.classnames,
            self.templates,
            self.images,
            self.batch_size,
            self.context_length,
        )
        return classification_metrics(logits, self.labels)
