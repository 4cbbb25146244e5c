"""LiT (Zhai et al. 2022): tower policies and locking, pretrained towers, cached embeddings.

The training side lives one layer up, in `clipforge.train`: the cached-embedding step
(`train.lit_step.make_lit_step_fn`) and image-tower pretraining (`train.pretrain_image`).
"""

from ..checkpoints.classifier import load_classifier, save_classifier
from ..data.cache_writer import cache_embeddings
from ..data.embedding_cache import (
    CachedPairs,
    CacheMismatchError,
    EmbeddingCache,
    tower_fingerprint,
)
from ..models.classifier import ImageClassifier
from ..models.hf_text import HFTextEncoder, HFTokenizer
from .build import ImageTower, build_lit_model, load_image_tower
from .locking import LiTPolicy, TowerPolicy, apply_policy, lock_tower, unlock_tower

__all__ = [
    "CacheMismatchError",
    "CachedPairs",
    "EmbeddingCache",
    "HFTextEncoder",
    "HFTokenizer",
    "ImageClassifier",
    "ImageTower",
    "LiTPolicy",
    "TowerPolicy",
    "apply_policy",
    "build_lit_model",
    "cache_embeddings",
    "load_classifier",
    "load_image_tower",
    "lock_tower",
    "save_classifier",
    "tower_fingerprint",
    "unlock_tower",
]
