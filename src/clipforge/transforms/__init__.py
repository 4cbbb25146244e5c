"""Image loading and preprocessing (PIL + torch, no torchvision).

- `config`: `PreprocessConfig` (what a model expects: input size, mean/std, resize filter), OPENAI_MEAN/STD;
- `images`: reading files (header checks, decoding, EXIF rotation, any mode -> RGB, reduced-scale JPEG);
- `standard`: the exact transforms, OpenAI's eval preprocessing and the two training crops
  (`eval_transform`, `train_transform`), with torchvision's rounding rules and RNG calls;
- `fast`: the fast training path (`fast_train_transform`): the same crops, less work, uint8 output.

Imports run one way inside the package: config, images <- standard <- fast. Everything is importable
from `clipforge.transforms` itself.
"""

from .config import INTERPOLATIONS, OPENAI_MEAN, OPENAI_STD, PreprocessConfig
from .fast import EncodedImage, FastTrainTransform, fast_train_transform
from .fast import _resize_plan as _resize_plan  # tests/test_fast_transform.py checks these two
from .fast import _torch_aa_kernel as _torch_aa_kernel
from .images import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    dct_scale,
    decode_upright,
    exif_orientation,
    load_image,
    load_image_reduced,
    open_image,
    to_rgb,
)
from .standard import (
    TRAIN_MODES,
    EvalTransform,
    TrainTransform,
    center_crop,
    eval_transform,
    normalise_uint8,
    resize_shortest_side,
    train_transform,
)

__all__ = [
    "DEFAULT_MAX_ASPECT",
    "DEFAULT_MAX_PIXELS",
    "INTERPOLATIONS",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "TRAIN_MODES",
    "EncodedImage",
    "EvalTransform",
    "FastTrainTransform",
    "ImageLoadError",
    "PreprocessConfig",
    "TrainTransform",
    "center_crop",
    "dct_scale",
    "decode_upright",
    "eval_transform",
    "exif_orientation",
    "fast_train_transform",
    "load_image",
    "load_image_reduced",
    "normalise_uint8",
    "open_image",
    "resize_shortest_side",
    "to_rgb",
    "train_transform",
]
