from .clip import CLIP, CLIPOutput, create_model
from .text import TextTransformer
from .vision import ModifiedResNet, VisionTransformer

__all__ = ["CLIP", "CLIPOutput", "ModifiedResNet", "TextTransformer", "VisionTransformer", "create_model"]
