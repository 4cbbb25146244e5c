"""Load any supported checkpoint into clipforge; save clipforge, OpenAI and HF formats.

Formats read by `load` (detected from the path, then from the keys):
- OpenAI: TorchScript archive as published (read without running its code) or a plain state dict;
- OpenCLIP: `{"epoch", "name", "state_dict", ...}` with `module.` prefixes, .pt/.bin/.safetensors;
- HF CLIP directory: config.json + model.safetensors or pytorch_model.bin;
- clipforge directory: config.json (`"format": "clipforge"`), model.safetensors, tokenizer files.
Weights are upcast to fp32 exactly (no round trip through fp16, unlike OpenAI's own loader).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import CLIPConfig
from ..models.clip import CLIP
from .convert_hf import config_from_hf, convert_hf_to_clipforge
from .convert_openai import convert_openai_to_clipforge, infer_config_from_openai
from .keys import check_shapes, meta_state_dict, shapes_of
from .torchscript import is_torchscript_archive, read_torchscript_state_dict

FORMAT_NAME = "clipforge"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
HF_TEXT_DIR = "text_tower"  # a LiT model's HF text encoder: its config.json and tokenizer files
HF_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class Checkpoint:
    """A checkpoint read into clipforge's layout (fp32), before a model is built."""

    state_dict: dict[str, torch.Tensor]
    config: CLIPConfig
    source_format: str  # "openai-torchscript" | "openai" | "openclip" | "hf" | "clipforge"
    path: Path
    spec: dict[str, Any]  # clipforge config.json (preprocess / tokenizer entries) or {}


def read_checkpoint(path: str | Path, config: CLIPConfig | None = None) -> Checkpoint:
    """Read any supported checkpoint into clipforge's state-dict layout, upcast to fp32. `config`
    overrides the architecture inferred from the shapes (e.g. for heads or GELU models)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_directory(path, config)
    if is_torchscript_archive(path):
        sd, fmt = _read_torchscript(path), "openai-torchscript"
    else:
        sd, fmt = _read_weights_file(path)
    sd = _upcast(sd)
    if "text_projection" in sd:  # OpenAI layout (OpenAI or OpenCLIP files)
        try:
            cfg = config or infer_config_from_openai(sd)
        except KeyError as e:  # a key the architecture cannot be read without
            raise ValueError(f"{path}: {e.args[0]}") from None
        sd = convert_openai_to_clipforge(sd, cfg, f"{path} (OpenAI layout)")
        return Checkpoint(sd, cfg, fmt, path, {})
    if "text.proj" in sd:
        if config is None:
            raise ValueError(
                f"{path}: a clipforge-layout state dict needs `config=` (or save it with save_pretrained)"
            )
        check_shapes(sd, shapes_of(meta_state_dict(config)), f"{path}")
        return Checkpoint(sd, config, "clipforge", path, {})
    if "text_model.embeddings.token_embedding.weight" in sd:
        raise ValueError(
            f"{path}: a HF CLIPModel state dict needs its config.json: load the directory holding both"
        )
    raise ValueError(f"{path}: not a CLIP checkpoint in a known layout (first keys: {list(sd)[:5]})")


def _read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    # No fallback to torch.jit.load: it runs code stored in the archive (a scripted __setstate__).
    try:
        return read_torchscript_state_dict(path)
    except Exception as e:  # whatever the safe reader could not make sense of (hostile bytes included)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: a TorchScript archive clipforge cannot read without running its code ({reason}); "
            "clipforge never runs code from a checkpoint. If you trust the file, load it with the code "
            "that wrote it and save model.state_dict() (torch.save or safetensors), then load that"
        ) from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors' load_file with its errors (truncated file, garbage header) as one line naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"{path}: not a readable safetensors file ({reason}); it may be truncated: copy or save it again"
        ) from None


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata=None) -> None:
    """safetensors' save_file; an I/O failure (a full disk) is an OSError naming the file, as Python's own
    writes raise, instead of the library's SafetensorError."""
    import errno as errno_mod
    import os
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        n = int(code.group(1))
        raise OSError(n, os.strerror(n) if n else errno_mod.errorcode.get(n, str(e)), str(path)) from None


def _read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if path.suffix == ".safetensors":
        obj: Any = load_safetensors(path)
    else:
        try:
            with warnings.catch_warnings():  # protocol-4 pickles: refused or read all the same
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # hostile, truncated or foreign bytes: weights_only=True ran nothing
            raise ValueError(
                f"{path}: not a checkpoint clipforge can read safely (torch.load with weights_only=True "
                f"failed: {_torch_load_reason(e)}); expected an OpenAI / OpenCLIP / HF / clipforge checkpoint"
            ) from None
    fmt = "openai"
    if isinstance(obj, Mapping) and "state_dict" in obj:  # OpenCLIP training checkpoint
        obj, fmt = obj["state_dict"], "openclip"
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj, fmt = {k[len("module.") :]: v for k, v in obj.items()}, "openclip"
    return dict(obj), fmt


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _torch_load_reason(e: Exception) -> str:
    """The line of torch.load's error that says what was wrong (its message also suggests
    turning weights_only off, which is exactly what clipforge must never do)."""
    for line in str(e).splitlines():
        line = line.split("WeightsUnpickler error:", 1)[-1].strip().strip("'")
        if line and not line.startswith(_TORCH_BOILERPLATE):
            if not any(c.isalpha() for c in line):  # a text file: KeyError('101') from the legacy reader
                return f"not a torch.save file ({type(e).__name__} {line} while unpickling)"
            return line
    return type(e).__name__


def _read_directory(path: Path, config: CLIPConfig | None) -> Checkpoint:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: a checkpoint directory needs config.json")
    spec = _read_json(cfg_file)
    if spec.get("format") == FORMAT_NAME:
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: clipforge directory lacks {WEIGHTS_FILE}")
        cfg = config or CLIPConfig.from_dict(spec["model"])
        sd = _upcast(load_safetensors(weights))
        if not _has_hf_text(spec):  # (a HF text tower is checked against the built model, build_model)
            check_shapes(sd, shapes_of(meta_state_dict(cfg)), f"{weights}")
        return Checkpoint(sd, cfg, "clipforge", path, spec)
    if spec.get("model_type") == "clip" or "vision_config" in spec:
        try:
            cfg = config or config_from_hf(spec)
        except ValueError as e:
            raise ValueError(f"{cfg_file}: {e}") from None
        weights = next((path / n for n in HF_WEIGHTS_FILES if (path / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path}: HF CLIP directory lacks {' or '.join(HF_WEIGHTS_FILES)}")
        sd, _ = _read_weights_file(weights)
        return Checkpoint(
            convert_hf_to_clipforge(_upcast(sd), cfg, f"{weights} (HF CLIPModel)"),
            cfg,
            "hf",
            path,
            _hf_preprocess_spec(path),
        )
    raise ValueError(f'{cfg_file}: neither a clipforge ("format": "clipforge") nor a HF CLIP config')


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _hf_preprocess_spec(path: Path) -> dict[str, Any]:
    f = path / "preprocessor_config.json"
    if not f.is_file():
        return {}
    p = _read_json(f)
    crop = p.get("crop_size")
    size = crop.get("height") if isinstance(crop, dict) else crop
    out = {"preprocess": {}}
    if size:
        out["preprocess"]["image_size"] = int(size)
    if "image_mean" in p and "image_std" in p:
        out["preprocess"].update(mean=list(p["image_mean"]), std=list(p["image_std"]))
    return out


def _upcast(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors to fp32 (exact); integer buffers (BatchNorm's num_batches_tracked) as they are."""
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _has_hf_text(spec: Mapping[str, Any]) -> bool:
    return (spec.get("text_tower") or {}).get("kind") == "hf"


def _hf_text_tower(ckpt: Checkpoint):
    """The HF text encoder of a LiT directory, built from text_tower/ (config + tokenizer), weights not
    yet loaded (they are in model.safetensors)."""
    from ..models.hf_text import HFTextEncoder

    t = ckpt.spec["text_tower"]
    return HFTextEncoder.from_pretrained(
        ckpt.path / t.get("dir", HF_TEXT_DIR), t["embed_dim"], pooling=t["pooling"], pretrained=False
    )


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a one-line error for a bad name or a GPU that is not there (torch's
    own are a RuntimeError / AssertionError from deep inside Module.to)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r}: no CUDA GPU is visible here (torch.cuda.is_available() is False)"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    return dev


def build_model(ckpt: Checkpoint, device: str | torch.device = "cpu") -> CLIP:
    """A CLIP in eval mode holding the checkpoint's weights (built on meta and assigned: no random init)."""
    device = check_device(device)
    if _has_hf_text(ckpt.spec):  # HF modules keep non-persistent buffers: build them for real
        model = CLIP(ckpt.config, text_tower=_hf_text_tower(ckpt))
        check_shapes(ckpt.state_dict, shapes_of(model.state_dict()), f"{ckpt.path / WEIGHTS_FILE}")
        model.load_state_dict(ckpt.state_dict, strict=True)
        return model.to(device).eval()
    with torch.device("meta"):
        model = CLIP(ckpt.config)
    model.load_state_dict({k: v.contiguous() for k, v in ckpt.state_dict.items()}, strict=True, assign=True)
    return model.to(device).eval()


def load(path: str | Path, device: str | torch.device = "cpu", config: CLIPConfig | None = None):
    """Load a checkpoint of any supported format -> `(model, preprocess, tokenizer)`.

    preprocess: `clipforge.transforms.eval_transform` for the model's input size (and the mean/std a
    clipforge or HF directory records). tokenizer: the directory's tokenizer files when present, else
    OpenAI's BPE (`Tokenizer.from_openai_vocab`) when the model has its 49408-token vocabulary. When
    neither is available, the tokenizer is None and a warning says why (images still work).
    """
    check_device(device)  # before reading what may be gigabytes
    ckpt = read_checkpoint(path, config)
    model = build_model(ckpt, device)
    return model, preprocess_for(ckpt), tokenizer_for(ckpt)


def preprocess_for(ckpt: Checkpoint):
    from ..transforms import PreprocessConfig, eval_transform

    spec = dict(ckpt.spec.get("preprocess") or {})
    spec.setdefault("image_size", ckpt.config.vision.image_size)
    return eval_transform(PreprocessConfig.from_dict(spec))


def tokenizer_for(ckpt: Checkpoint):
    from ..tokenizer import Tokenizer

    text = ckpt.config.text
    if _has_hf_text(ckpt.spec):
        from ..models.hf_text import HFTokenizer

        t = ckpt.spec["text_tower"]
        ctx = (ckpt.spec.get("tokenizer") or {}).get("context_length") or text.context_length
        return HFTokenizer.from_pretrained(ckpt.path / t.get("dir", HF_TEXT_DIR), context_length=ctx)
    d = ckpt.path if ckpt.path.is_dir() else None
    if d is not None and (
        ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()) or (d / "tokenizer.json").is_file()
    ):
        tok = Tokenizer.from_hf(d, context_length=text.context_length)
    elif text.vocab_size == 49408:
        try:
            tok = Tokenizer.from_openai_vocab(context_length=text.context_length)
        except FileNotFoundError as e:
            warnings.warn(f"{ckpt.path}: no tokenizer returned: {e}", stacklevel=3)
            return None
    else:
        warnings.warn(
            f"{ckpt.path}: no tokenizer returned: the model's vocabulary has {text.vocab_size} tokens and "
            "the checkpoint carries no tokenizer files (vocab.json + merges.txt or tokenizer.json)",
            stacklevel=3,
        )
        return None
    if tok.vocab_size > text.vocab_size:
        raise ValueError(
            f"{ckpt.path}: the tokenizer has {tok.vocab_size} tokens, the model only {text.vocab_size}"
        )
    return tok
