"""Evaluation: zero-shot, retrieval, linear probe, few-shot, robustness; CLIP_benchmark-shaped reports."""

from .features import cached_image_features, encode_images, encode_texts, model_fingerprint
from .fewshot import few_shot_curve, few_shot_probe, plot_few_shot
from .linear_probe import LinearProbeResult, fit_logistic, linear_probe
from .report import markdown_table, result_record
from .retrieval import RetrievalEvaluator, flatten_captions, retrieval_metrics, retrieval_ranks
from .robustness import effective_robustness, fit_logit_line, plot_robustness
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
    "LinearProbeResult",
    "RetrievalEvaluator",
    "ZeroShotEvaluator",
    "cached_image_features",
    "classification_metrics",
    "effective_robustness",
    "encode_images",
    "encode_texts",
    "few_shot_curve",
    "few_shot_probe",
    "fit_logistic",
    "fit_logit_line",
    "flatten_captions",
    "format_template",
    "linear_probe",
    "load_classnames",
    "load_templates",
    "markdown_table",
    "model_fingerprint",
    "plot_few_shot",
    "plot_robustness",
    "result_record",
    "retrieval_metrics",
    "retrieval_ranks",
    "zero_shot_classifier",
    "zero_shot_logits",
    "zero_shot_metrics",
]
