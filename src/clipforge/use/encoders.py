"""One interface over the runtimes that turn images and texts into normalised embeddings.

    enc = open_encoder("ckpt_dir")                     # torch: any checkpoint `clipforge.load` reads
    enc = open_encoder("onnx_dir", runtime="onnx")     # the files `clipforge export-onnx` wrote
    enc.encode_pixels(enc.preprocess(img)[None])       # (N, D) float32, unit norm
    enc.encode_texts(["a dog"])                        # (N, D) float32, unit norm

Both runtimes carry the same facts: the model's fingerprint (what made these embeddings, written into
every embedding manifest), its preprocessing, tokenizer, logit scale and bias (softmax for CLIP, sigmoid
for SigLIP-style models with a bias).
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoints.io import build_model, check_device, preprocess_for, read_checkpoint, tokenizer_for
from ..config import PRESETS, get_config
from ..eval.features import model_device, model_fingerprint, tokenize
from ..eval.templates import as_texts
from ..models.clip import CLIP
from ..models.hardware import slow_bf16_reason
from ..tokenizer import Tokenizer
from ..transforms import PreprocessConfig, eval_transform

RUNTIMES = ("torch", "onnx")
ONNX_SPEC = "clipforge_onnx.json"


class Encoder:
    """Base: what every runtime exposes. Subclasses implement `_image` and `_text` (unnormalised)."""

    runtime: str
    source: str
    fingerprint: str
    embed_dim: int
    context_length: int
    preprocess_config: PreprocessConfig
    tokenizer: Callable | None
    logit_scale: float  # exp(learned log-scale), clamped as in training
    logit_bias: float | None  # set for sigmoid-loss (SigLIP-style) models

    @property
    def preprocess(self) -> Callable:
        """PIL image -> (3, S, S) normalised tensor (the model's eval transform)."""
        return eval_transform(self.preprocess_config)

    @property
    def sigmoid(self) -> bool:
        """Label probabilities are independent sigmoids (SigLIP), not a softmax (CLIP)."""
        return self.logit_bias is not None

    def describe(self) -> dict[str, Any]:
        """The facts an embedding manifest records about the model."""
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "runtime": self.runtime,
            "embed_dim": self.embed_dim,
            "context_length": self.context_length,
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
        }

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) preprocessed pixels -> (N, D) float32 unit-norm features on CPU."""
        return F.normalize(self._image(pixels).float().cpu(), dim=-1)

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T) token ids -> (N, D) float32 unit-norm features on CPU."""
        return F.normalize(self._text(tokens).float().cpu(), dim=-1)

    def tokenize(self, texts: str | Iterable[str]) -> torch.Tensor:
        """Strings (one str is one text) -> (N, context_length) token ids, truncated to the context."""
        if self.tokenizer is None:
            raise ValueError(f"{self.source}: the model has no tokenizer, so it cannot embed texts")
        return tokenize(self.tokenizer, as_texts(texts), self.context_length)

    def encode_texts(self, texts: str | Iterable[str], batch_size: int = 256) -> torch.Tensor:
        """Strings (any iterable; one str is one text) -> (N, D) float32 unit-norm features (truncated to
        the context length)."""
        texts = as_texts(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim)
        out = [
            self.encode_tokens(self.tokenize(texts[i : i + batch_size]))
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(out)

    def _image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# fp32; bf16: fp32 weights under autocast (matrix products in bf16; LayerNorm, softmax and the residual
# stream in fp32); bf16-weights: a bf16 copy of the weights, activations in bf16 between the matrix
# products (LayerNorm and CPU attention still computed in fp32, see models/transformer.py) - no weight
# casts per call and half the memory traffic, for inference on bf16-capable CPUs/GPUs; fp16: autocast.
PRECISIONS = ("fp32", "bf16", "bf16-weights", "fp16")


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode for the block, then every submodule's own flag back: a model handed in by the
    caller (mid-training, a ResNet's BatchNorm; a LiT model whose locked tower stays in eval) is left as
    it was."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


class TorchEncoder(Encoder):
    """A clipforge CLIP at one of `PRECISIONS` (features always returned in fp32), run in eval mode.

    `device` None: where the model is. A model passed in keeps its train/eval mode (each forward runs in
    eval mode and restores it)."""

    runtime = "torch"

    def __init__(
        self,
        model: CLIP,
        preprocess_config: PreprocessConfig,
        tokenizer: Callable | None,
        *,
        source: str = "",
        device: str | torch.device | None = None,
        precision: str = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        self.device = check_device(device) if device is not None else model_device(model)
        slow = slow_bf16_reason(self.device) if precision.startswith("bf16") else None
        if slow:
            warnings.warn(f"{slow}; use fp32", stacklevel=2)
        self.precision = precision
        self.source = source
        self.fingerprint = model_fingerprint(model)  # of the weights as given, whatever the precision
        self.embed_dim = model.config.embed_dim
        self.context_length = model.config.text.context_length
        self.preprocess_config = preprocess_config
        self.tokenizer = tokenizer
        self.logit_scale = float(model.logit_scale.detach().exp().clamp(max=model.config.max_logit_scale))
        self.logit_bias = None if model.logit_bias is None else float(model.logit_bias.detach())
        if precision == "bf16-weights":  # a copy: the caller's model keeps its weights
            model = copy.deepcopy(model).to(dtype=torch.bfloat16)
        self.model = model.to(self.device)
        self._input_dtype = torch.bfloat16 if precision == "bf16-weights" else None

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _image(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._autocast(), eval_mode(self.model):
            return self.model.encode_image(
                pixels.to(self.device, dtype=self._input_dtype or pixels.dtype, non_blocking=True)
            )

    def _text(self, tokens: torch.Tensor) -> torch.Tensor:
        with self._autocast(), eval_mode(self.model):
            return self.model.encode_text(tokens.to(self.device))


class OnnxEncoder(Encoder):
    """The two graphs of `export_onnx` on ONNX Runtime (CPU provider unless `providers` says otherwise)."""

    runtime = "onnx"

    def __init__(self, directory: str | Path, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        d = Path(directory)
        spec_path = d / ONNX_SPEC
        if not spec_path.is_file():
            raise FileNotFoundError(f"{spec_path} not found: point at a directory written by export-onnx")
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        providers = list(providers or ["CPUExecutionProvider"])
        self.visual = ort.InferenceSession(str(d / spec["visual"]), providers=providers)
        self.textual = ort.InferenceSession(str(d / spec["textual"]), providers=providers)
        self.source = str(d)
        self.fingerprint = spec["fingerprint"]
        self.embed_dim = int(spec["embed_dim"])
        self.context_length = int(spec["context_length"])
        self.preprocess_config = PreprocessConfig.from_dict(spec["preprocess"])
        self.tokenizer = (
            Tokenizer.from_hf(d, context_length=self.context_length) if spec["tokenizer"] else None
        )
        self.logit_scale = float(spec["logit_scale"])
        self.logit_bias = spec["logit_bias"]

    def _image(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.detach().float().cpu().numpy()
        return torch.from_numpy(self.visual.run(None, {"pixels": x})[0])

    def _text(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.detach().cpu().numpy().astype(np.int64)
        return torch.from_numpy(self.textual.run(None, {"tokens": x})[0])


def load_torch_model(model: str | Path) -> tuple[CLIP, PreprocessConfig, Callable | None, str]:
    """(model, preprocessing, tokenizer, source) from a checkpoint path, or from a preset name (random
    weights, OpenAI's tokenizer: for tests and benchmarks; a warning says so)."""
    path = Path(model)
    if not path.exists() and str(model).replace("/", "-") in PRESETS:
        warnings.warn(f"{model!r} is a preset name, not a checkpoint: the weights are random", stacklevel=3)
        torch.manual_seed(0)
        net = CLIP(get_config(str(model))).eval()
        cfg = PreprocessConfig(net.config.vision.image_size)
        tok = Tokenizer.from_openai_vocab(context_length=net.config.text.context_length)
        return net, cfg, tok, f"preset:{model}"
    ckpt = read_checkpoint(path)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # tokenizer_for warns when there is none; embed says so if texts need it
        tok = tokenizer_for(ckpt)
    return build_model(ckpt), preprocess_for(ckpt).config, tok, str(path)


def open_encoder(
    model: str | Path | CLIP | Encoder,
    runtime: str = "torch",
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    tokenizer: Callable | None = None,
    preprocess: PreprocessConfig | None = None,
) -> Encoder:
    """An Encoder from a checkpoint path or preset name (torch), an export-onnx directory (onnx), a CLIP
    (with `tokenizer` / `preprocess`, defaults: OpenAI's BPE when the vocabulary fits, the model's size),
    or an Encoder (returned as is). `device` None: CPU for a path, the model's own device for a CLIP
    (which is moved only when another device is named, and keeps its train/eval mode)."""
    if isinstance(model, Encoder):
        return model
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if runtime == "onnx":
        if precision != "fp32":
            raise ValueError(
                f"precision {precision!r} is for the torch runtime: an ONNX graph runs in the precision "
                "it was exported in"
            )
        if isinstance(model, CLIP):
            raise TypeError("runtime='onnx' needs the directory export-onnx wrote, not a model object")
        return OnnxEncoder(
            model, providers=["CUDAExecutionProvider"] if str(device).startswith("cuda") else None
        )
    if isinstance(model, CLIP):
        cfg = preprocess or PreprocessConfig(model.config.vision.image_size)
        if tokenizer is None and model.config.text.vocab_size == 49408:
            tokenizer = Tokenizer.from_openai_vocab(context_length=model.config.text.context_length)
        return TorchEncoder(
            model, cfg, tokenizer, source="<in-memory model>", device=device, precision=precision
        )
    net, cfg, tok, source = load_torch_model(model)
    return TorchEncoder(
        net, preprocess or cfg, tokenizer or tok, source=source, device=device or "cpu", precision=precision
    )
