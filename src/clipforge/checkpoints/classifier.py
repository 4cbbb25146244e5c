"""Image-classifier checkpoint directories (`clipforge pretrain-image`): save, recognise, load.

Directory: config.json (`"format": "clipforge-classifier"`, the VisionConfig, embed_dim, class names,
preprocessing) and model.safetensors (read with safetensors, never with pickle).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..config import VisionConfig
from ..files import atomic_directory
from ..models.classifier import ImageClassifier

CLASSIFIER_FORMAT = "clipforge-classifier"
WEIGHTS_FILE = "model.safetensors"


def _vision_dict(v: VisionConfig) -> dict[str, Any]:
    d = asdict(v)
    if isinstance(d["layers"], tuple):
        d["layers"] = list(d["layers"])
    return d


def save_classifier(
    model: ImageClassifier, directory: str | Path, classnames: list[str] | None = None, preprocess: Any = None
) -> Path:
    """Write a classifier checkpoint directory (atomically)."""
    from .io import save_safetensors

    pre = preprocess.to_dict() if hasattr(preprocess, "to_dict") else dict(preprocess or {})
    pre.setdefault("image_size", model.vision_config.image_size)
    spec = {
        "format": CLASSIFIER_FORMAT,
        "vision": _vision_dict(model.vision_config),
        "embed_dim": model.embed_dim,
        "num_classes": model.num_classes,
        "classnames": list(classnames) if classnames is not None else None,
        "preprocess": pre,
    }
    with atomic_directory(directory) as tmp:
        sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_safetensors(sd, tmp / WEIGHTS_FILE)
        (tmp / "config.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return Path(directory)


def is_classifier_dir(path: str | Path) -> bool:
    f = Path(path) / "config.json"
    return f.is_file() and json.loads(f.read_text(encoding="utf-8")).get("format") == CLASSIFIER_FORMAT


def load_classifier(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[ImageClassifier, dict]:
    """(classifier in eval mode, its config.json spec)."""
    from .io import load_safetensors

    d = Path(directory)
    if not is_classifier_dir(d):
        raise ValueError(
            f"{d}: not a clipforge image-classifier directory (config.json with format {CLASSIFIER_FORMAT!r})"
        )
    spec = json.loads((d / "config.json").read_text(encoding="utf-8"))
    model = ImageClassifier(VisionConfig(**spec["vision"]), spec["embed_dim"], spec["num_classes"])
    missing, unexpected = model.load_state_dict(load_safetensors(d / WEIGHTS_FILE), strict=False)
    if missing or unexpected:
        raise ValueError(f"{d / WEIGHTS_FILE}: missing keys {missing}, unexpected keys {unexpected}")
    return model.to(device).eval(), spec
