"""Write checkpoints: clipforge directories, OpenAI-layout state dicts, HF CLIPModel directories.

Every writer is atomic: files go to a temporary sibling first and are moved into place with
`os.replace`, so an interrupted save never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_directory, atomic_file
from ..models.clip import CLIP
from ..models.hf_text import HFTextEncoder
from .convert_hf import config_to_hf, convert_clipforge_to_hf
from .convert_openai import convert_clipforge_to_openai
from .io import FORMAT_NAME, FORMAT_VERSION, HF_TEXT_DIR, WEIGHTS_FILE, save_safetensors


def _tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def _save_safetensors(sd: dict[str, torch.Tensor], path: Path) -> None:

    save_safetensors(_tensors(sd), path, metadata={"format": "pt"})


def _preprocess_dict(model: CLIP, preprocess: Any) -> dict[str, Any]:
    from ..transforms import PreprocessConfig

    cfg = getattr(preprocess, "config", preprocess)  # an EvalTransform carries its PreprocessConfig
    if cfg is None:
        cfg = PreprocessConfig(model.config.vision.image_size)
    if not isinstance(cfg, PreprocessConfig):
        raise TypeError(
            f"preprocess must be a PreprocessConfig or a clipforge transform, got {type(preprocess).__name__}"
        )
    return cfg.to_dict()


def save_pretrained(
    model: CLIP, directory: str | Path, tokenizer: Any = None, preprocess: Any = None
) -> Path:
    """Write a clipforge checkpoint directory: config.json (model config + preprocessing + tokenizer
    spec), model.safetensors, and the tokenizer's files (`tokenizer.save(dir)`) when one is given."""
    spec: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "preprocess": _preprocess_dict(model, preprocess),
        "tokenizer": None,
    }
    hf_text = isinstance(model.text, HFTextEncoder)
    if hf_text:  # a LiT text tower from HF: its config and tokenizer files go to text_tower/
        spec["text_tower"] = {**model.text.spec(), "dir": HF_TEXT_DIR}
    if tokenizer is not None:
        spec["tokenizer"] = {
            "kind": "hf" if hf_text else "clip-bpe",
            "files": HF_TEXT_DIR if hf_text else ["vocab.json", "merges.txt", "tokenizer_config.json"],
            "vocab_size": tokenizer.vocab_size,
            "context_length": tokenizer.context_length,
            "sot_token_id": tokenizer.sot_token_id,
            "eot_token_id": tokenizer.eot_token_id,
        }
    with atomic_directory(directory) as tmp:
        # every weight, the HF encoder's included (as text.model.*), in the one safetensors file
        _save_safetensors(model.state_dict(), tmp / WEIGHTS_FILE)
        if hf_text:
            (tmp / HF_TEXT_DIR).mkdir()
            model.text.model.config.save_pretrained(str(tmp / HF_TEXT_DIR))
        if tokenizer is not None:
            tokenizer.save(tmp / HF_TEXT_DIR if hf_text else tmp)
        (tmp / "config.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return Path(directory)


def _refuse_hf_text(model: CLIP, fmt: str) -> None:
    if isinstance(model.text, HFTextEncoder):
        raise ValueError(
            f"cannot write the {fmt} format: this model's text tower is a HF "
            f"{model.text.spec()['model_type']} encoder (LiT), and {fmt} checkpoints hold only CLIP's own "
            "text transformer; use --format clipforge"
        )


def save_openai(model: CLIP, path: str | Path) -> Path:
    """Write a plain OpenAI-layout state dict (`torch.save`), as OpenCLIP's converted checkpoints;
    `clip.model.build_model` and `clipforge.load` read it."""
    _refuse_hf_text(model, "openai")
    sd = _tensors(convert_clipforge_to_openai(model.state_dict(), model.config))
    atomic_file(path, lambda tmp: torch.save(sd, tmp))
    return Path(path)


def save_hf(model: CLIP, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write a HF CLIP directory (config.json + model.safetensors [+ vocab.json/merges.txt]) that
    `transformers.CLIPModel.from_pretrained` reads."""
    _refuse_hf_text(model, "hf")
    sd = convert_clipforge_to_hf(model.state_dict(), model.config)
    with atomic_directory(directory) as tmp:
        _save_safetensors(sd, tmp / "model.safetensors")
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / "config.json").write_text(
            json.dumps(config_to_hf(model.config), indent=2) + "\n", encoding="utf-8"
        )
    return Path(directory)


FORMATS = ("clipforge", "openai", "hf")
OPENAI_VOCAB_SIZE = 49408


def convert_checkpoint(src: str | Path, dst: str | Path, format: str, config: Any = None) -> Path:
    """Read any supported checkpoint and write it as `format` (clipforge | openai | hf). Lossless:
    tensors are renamed, split or transposed, never rounded (fp16 sources are upcast exactly)."""
    from .io import build_model, preprocess_for, read_checkpoint, tokenizer_for

    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    ckpt = read_checkpoint(src, config)
    model = build_model(ckpt)
    if format == "openai":
        if ckpt.config.text.vocab_size != OPENAI_VOCAB_SIZE:  # its tokenizer cannot be found again
            warnings.warn(
                f"{dst}: the openai format holds no tokenizer, and this model's {ckpt.config.text.vocab_size}"
                f"-token vocabulary is not OpenAI's: keep {src}'s tokenizer files (vocab.json, merges.txt) "
                "or convert to --format clipforge / hf, which carry them",
                stacklevel=2,
            )
        return save_openai(model, dst)
    tokenizer = tokenizer_for(ckpt)
    if format == "hf":
        return save_hf(model, dst, tokenizer=tokenizer)
    return save_pretrained(model, dst, tokenizer=tokenizer, preprocess=preprocess_for(ckpt))
