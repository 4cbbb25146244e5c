"""Export the two towers as separate ONNX graphs (what OpenCLIP users keep asking for, open_clip #186):

    OUT/visual.onnx          pixels (N, 3, S, S) float32 -> features (N, D)
    OUT/textual.onnx         tokens (N, T) int64, T <= context -> features (N, D), pooled at the EOT
    OUT/clipforge_onnx.json  preprocessing, tokenizer and dimension facts, logit scale / bias, the
                             model's fingerprint (embeddings from ONNX and torch share one directory)
    OUT/vocab.json, merges.txt, tokenizer_config.json   the tokenizer (HF CLIPTokenizer reads them too)

Features are the projected `encode_image` / `encode_text` outputs (`normalize=True` adds the L2 norm
to the graphs). Batch and text length are dynamic. The legacy TorchScript-based exporter
(`dynamo=False`, opset 17) is used: it needs no onnxscript, and our attention (SDPA with a fused q/k/v
projection, not nn.MultiheadAttention's fast path) exports as plain MatMul/Softmax.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.clip import CLIP
from ..models.text import TextTransformer
from .encoders import ONNX_SPEC, Encoder, TorchEncoder, open_encoder

OPSET = 17


class VisualGraph(nn.Module):
    def __init__(self, model: CLIP, normalize: bool) -> None:
        super().__init__()
        self.visual, self.normalize = model.visual, normalize

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.visual(pixels)
        return F.normalize(x, dim=-1) if self.normalize else x


class TextGraph(nn.Module):
    """TextTransformer.forward without its cut to the longest EOT (a data-dependent length that tracing
    would freeze): causal attention makes the EOT feature independent of the positions after it."""

    def __init__(self, model: CLIP, normalize: bool) -> None:
        super().__init__()
        if not isinstance(model.text, TextTransformer):
            raise TypeError(
                f"export-onnx supports clipforge's own text tower, not {type(model.text).__name__}"
            )
        self.text, self.normalize = model.text, normalize

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.text
        eot = tokens.argmax(dim=-1)  # (N,) the EOT has the largest id
        x = t.token_embedding(tokens) + t.pos_embed[: tokens.shape[1]]  # (N, T, w)
        x = t.transformer(x, causal=True)
        x = t.ln_final(x[torch.arange(x.shape[0]), eot]) @ t.proj  # (N, D)
        return F.normalize(x, dim=-1) if self.normalize else x


def export_onnx(
    model: str | Path | CLIP | Encoder, out: str | Path, *, normalize: bool = False, opset: int = OPSET
) -> dict[str, Any]:
    """Write the files of the module docstring into `out`; returns the JSON spec."""
    enc = open_encoder(model)
    if not isinstance(enc, TorchEncoder):
        raise TypeError("export_onnx needs a torch model (a checkpoint, preset name or CLIP)")
    net = enc.model
    if isinstance(model, CLIP | Encoder):  # the caller's model: exported from a copy, left where it is
        net = copy.deepcopy(net)
    net = net.float().cpu().eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s, ctx = net.config.vision.image_size, net.config.text.context_length
    pixels = torch.randn(2, 3, s, s)
    tokens = torch.zeros(2, ctx, dtype=torch.long)
    tokens[:, 0], tokens[0, 1], tokens[1, 1:4], tokens[0, 2], tokens[1, 4] = 1, 5, 7, ctx + 1, ctx + 1
    tokens[tokens == ctx + 1] = net.config.text.vocab_size - 1  # a plausible EOT
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape checks that hold for every input
        torch.onnx.export(
            VisualGraph(net, normalize).eval(),  # eval: the exporter restores the wrapper's mode into
            # every submodule afterwards, and a fresh module is in training mode (BatchNorm!)
            (pixels,),
            str(out / "visual.onnx"),
            input_names=["pixels"],
            output_names=["image_features"],
            dynamic_axes={"pixels": {0: "batch"}, "image_features": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
        torch.onnx.export(
            TextGraph(net, normalize).eval(),
            (tokens,),
            str(out / "textual.onnx"),
            input_names=["tokens"],
            output_names=["text_features"],
            dynamic_axes={"tokens": {0: "batch", 1: "length"}, "text_features": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    tok = enc.tokenizer
    if tok is not None and hasattr(tok, "save"):
        tok.save(out)
    spec = {
        "format": "clipforge-onnx",
        "version": 1,
        "visual": "visual.onnx",
        "textual": "textual.onnx",
        "normalized": normalize,
        "opset": opset,
        "source": enc.source,
        "fingerprint": enc.fingerprint,
        "embed_dim": enc.embed_dim,
        "context_length": ctx,
        "image_size": s,
        "vision_kind": net.config.vision.kind,
        "preprocess": enc.preprocess_config.to_dict(),
        "tokenizer": None
        if tok is None
        else {
            "files": ["vocab.json", "merges.txt", "tokenizer_config.json"],
            "sot_token_id": tok.sot_token_id,
            "eot_token_id": tok.eot_token_id,
            "pad_token_id": 0,
            "pooling": "argmax token id (EOT)",
        },
        "logit_scale": enc.logit_scale,
        "logit_bias": enc.logit_bias,
        "inputs": {"pixels": "float32 (N, 3, S, S), normalised", "tokens": "int64 (N, T), T <= context"},
    }
    (out / ONNX_SPEC).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return spec
