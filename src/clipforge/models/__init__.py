from .clip import CLIP, CLIPOutput, create_model
from .text import TextTransformer
from .towers import IMAGE_TOWERS, Tower, build_image_tower
from .vision import ModifiedResNet, VisionTransformer

__all__ = [
    "CLIP",
    "IMAGE_TOWERS",
    "CLIPOutput",
    "ModifiedResNet",
    "TextTransformer",
    "Tower",
    "VisionTransformer",
    "build_image_tower",
    "create_model",
]
