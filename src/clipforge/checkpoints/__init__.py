"""Checkpoint interop: load OpenAI / OpenCLIP / HF / clipforge checkpoints, save and convert them."""

from .classifier import is_classifier_dir, load_classifier, save_classifier
from .convert_hf import config_from_hf, config_to_hf, convert_clipforge_to_hf, convert_hf_to_clipforge
from .convert_openai import (
    convert_clipforge_to_openai,
    convert_openai_to_clipforge,
    infer_config_from_openai,
    openai_shapes,
)
from .io import Checkpoint, build_model, load, read_checkpoint
from .keys import StateDictMismatchError
from .save import convert_checkpoint, save_hf, save_openai, save_pretrained
from .state import StateFormatError, load_state, save_state
from .torchscript import is_torchscript_archive, read_torchscript_state_dict

__all__ = [
    "Checkpoint",
    "StateDictMismatchError",
    "StateFormatError",
    "build_model",
    "config_from_hf",
    "config_to_hf",
    "convert_checkpoint",
    "convert_clipforge_to_hf",
    "convert_clipforge_to_openai",
    "convert_hf_to_clipforge",
    "convert_openai_to_clipforge",
    "infer_config_from_openai",
    "is_classifier_dir",
    "is_torchscript_archive",
    "load",
    "load_classifier",
    "load_state",
    "openai_shapes",
    "read_checkpoint",
    "read_torchscript_state_dict",
    "save_classifier",
    "save_hf",
    "save_openai",
    "save_pretrained",
    "save_state",
]
