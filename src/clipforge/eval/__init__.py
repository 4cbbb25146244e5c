"""Evaluation: zero-shot, retrieval, linear probe, few-shot, robustness; CLIP_benchmark-shaped reports."""

from .features import cached_image_features, encode_images, encode_texts, model_fingerprint
from .retrieval import RetrievalEvaluator, flatten_captions, retrieval_metrics, retrieval_ranks
from .templates import DEFAULT_TEMPLATES, format_template, load_classnames, load_templates
from .zeroshot import (
    ZeroShotEvaluator,
    classification_metrics,
    zero_shot_classifier,
    zero_shot_logits,
    zero_shot_metrics,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "RetrievalEvaluator",
    "ZeroShotEvaluator",
    "cached_image_features",
    "classification_metrics",
    "encode_images",
    "encode_texts",
    "flatten_captions",
    "format_template",
    "load_classnames",
    "load_templates",
    "model_fingerprint",
    "retrieval_metrics",
    "retrieval_ranks",
    "zero_shot_classifier",
    "zero_shot_logits",
    "zero_shot_metrics",
]
