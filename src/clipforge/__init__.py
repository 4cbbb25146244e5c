"""clipforge: train, evaluate and use CLIP-style image-text models."""

from .checkpoints import load, save_pretrained
from .config import CLIPConfig, TextConfig, VisionConfig, get_config, list_models
from .models import CLIP, CLIPOutput, create_model
from .tokenizer import Tokenizer, train_bpe
from .transforms import PreprocessConfig, eval_transform, load_image, train_transform

__version__ = "0.1.0"

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPOutput",
    "PreprocessConfig",
    "TextConfig",
    "Tokenizer",
    "VisionConfig",
    "create_model",
    "eval_transform",
    "get_config",
    "list_models",
    "load",
    "load_image",
    "save_pretrained",
    "train_bpe",
    "train_transform",
]
