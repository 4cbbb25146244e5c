"""LiT (Zhai et al. 2022): pretrained towers, tower policies, image pretraining, cached embeddings."""

from ..data.embedding_cache import (
    CachedPairs,
    CacheMismatchError,
    EmbeddingCache,
    cache_embeddings,
    tower_fingerprint,
)
from ..models.classifier import ImageClassifier, load_classifier, save_classifier
from ..models.hf_text import HFTextEncoder, HFTokenizer
from ..train.locking import LiTPolicy, TowerPolicy, apply_policy, lock_tower, unlock_tower
from .build import ImageTower, build_lit_model, load_image_tower
from .pretrain import PretrainResult, pretrain_image, synthetic_labelled
from .step import make_lit_step_fn

__all__ = [
    "CacheMismatchError",
    "CachedPairs",
    "EmbeddingCache",
    "HFTextEncoder",
    "HFTokenizer",
    "ImageClassifier",
    "ImageTower",
    "LiTPolicy",
    "PretrainResult",
    "TowerPolicy",
    "apply_policy",
    "build_lit_model",
    "cache_embeddings",
    "load_classifier",
    "load_image_tower",
    "lock_tower",
    "make_lit_step_fn",
    "pretrain_image",
    "save_classifier",
    "synthetic_labelled",
    "tower_fingerprint",
    "unlock_tower",
]
