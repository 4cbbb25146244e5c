"""Using a model on collections: embed, index, search, classify, score, export to ONNX.

A layer beside train/ (neither imports the other): it builds on lit/, eval/, data/, checkpoints/ and the
core. Every CLI command of this group (`clipforge embed | index | search | classify | score |
export-onnx`) is a thin front end over a function here.
"""

from .embedder import EmbedOptions, embed
from .encoders import Encoder, open_encoder
from .store import EmbeddingStore

__all__ = ["EmbedOptions", "EmbeddingStore", "Encoder", "embed", "open_encoder"]
