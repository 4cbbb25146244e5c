"""clipforge: train, evaluate and use CLIP-style image-text models."""

from .config import CLIPConfig, TextConfig, VisionConfig, get_config, list_models
from .models import CLIP, CLIPOutput, create_model

__version__ = "0.1.0"

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPOutput",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "get_config",
    "list_models",
]
