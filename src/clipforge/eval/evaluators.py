"""Evaluators for training: `run(model, tokenizer) -> metrics` objects from evaluation inputs.

    evs = {name: evaluator_for(s) for name, s in source.eval_sets().items()}   # a Source's own sets
    evs |= validation_evaluators(val="val.csv", val_labelled="classes/", transform=eval_transform(pre))

A LabelledImages input becomes a zero-shot classifier evaluation, a CaptionedImages input a retrieval
(recall@k) evaluation; the trainer calls them every run.eval_every steps and at the end.
"""

from __future__ import annotations

from collections.abc import Callable

from ..data.sources import CaptionedImages, EvalSet, LabelledImages
from .datasets import open_labelled, open_retrieval
from .retrieval import RetrievalEvaluator
from .templates import load_templates
from .zeroshot import ZeroShotEvaluator

Evaluator = ZeroShotEvaluator | RetrievalEvaluator


def evaluator_for(s: EvalSet) -> Evaluator:
    if isinstance(s, LabelledImages):
        return ZeroShotEvaluator(s.classnames, s.templates, s.images, s.labels)
    if isinstance(s, CaptionedImages):
        return RetrievalEvaluator(s.images, s.captions, s.text_to_image)
    raise TypeError(f"no evaluator for {type(s).__name__}")


def validation_evaluators(
    transform: Callable,
    *,
    val: str | None = None,
    val_labelled: str | None = None,
    classnames: str | None = None,
    templates: str = "simple",
    image_key: str = "image",
    caption_key: str = "caption",
    label_key: str = "label",
    caption_sep: str | None = "||",
    root: str | None = None,
) -> dict[str, Evaluator]:
    """{"zeroshot": ...} over labelled images (class folders or a manifest with labels, prompts from
    `templates` filled with the class names) and {"retrieval": ...} over held-out pairs, for those given."""
    evs: dict[str, Evaluator] = {}
    if val_labelled:
        ds = open_labelled(val_labelled, transform, classnames, image_key, label_key)
        evs["zeroshot"] = ZeroShotEvaluator(ds.classnames, load_templates(templates), ds)
    if val:
        rs = open_retrieval(val, transform, image_key, caption_key, sep=caption_sep, root=root)
        evs["retrieval"] = RetrievalEvaluator(rs.images, rs.captions, rs.text_to_image)
    return evs
