"""Pretrained BERT-family text towers from a local HF directory (LiT with a pretrained text tower).

    tok = HFTokenizer.from_pretrained("path/to/minilm", context_length=64)
    tower = HFTextEncoder.from_pretrained("path/to/minilm", embed_dim=256, pooling="mean")
    features = tower(tok(["a red circle"]))  # (1, 256)

Token convention. Everything else in clipforge passes text as one LongTensor (N, T), zero-padded, and
relies on "the end token is the largest id" (the training step trims the batch to the longest
argmax position). `HFTokenizer` keeps that contract for a WordPiece vocabulary by appending one marker,
`end_token_id = len(hf vocabulary)`, right after the HF sequence ([CLS] ... [SEP]) and padding with 0.
`HFTextEncoder` turns the marker back into an attention mask: positions before it are real tokens,
the marker and everything after are padding. Trimming at the marker is exact.

Pooling: "mean" (sentence-transformers: average of the last hidden states over real tokens) or "cls"
(the first token's hidden state). A linear projection to the joint embedding (LiT's head on the text
side) follows; it is newly initialised, never part of the pretrained weights.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

Pooling = Literal["mean", "cls"]


def _auto():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a core dependency
        raise ImportError("HF text towers need the `transformers` package") from e
    return transformers


def _first_line(e: Exception) -> str:
    """The line of a torch.load error naming what was refused (the rest suggests turning weights_only off)."""
    lines = [x.strip() for x in str(e).splitlines() if "GLOBAL" in x or "WeightsUnpickler" in x]
    if not lines:
        return type(e).__name__
    return lines[0].removeprefix("WeightsUnpickler error:").split(". Please use", 1)[0].strip()


def _check_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a HF model directory (no config.json); pass a local directory")
    return path


class HFTokenizer:
    """A HF tokenizer (AutoTokenizer, local files only) returning clipforge-style token tensors."""

    def __init__(self, tokenizer, context_length: int = 77) -> None:
        if context_length < 3:
            raise ValueError(
                f"context_length must be >= 3 ([CLS] x [SEP] + end marker), got {context_length}"
            )
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.end_token_id = len(tokenizer)  # larger than every id of the HF vocabulary
        self.eot_token_id = self.end_token_id
        self.sot_token_id = (
            tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        )
        self.vocab_size = self.end_token_id + 1

    @classmethod
    def from_pretrained(cls, path: str | Path, context_length: int = 77) -> HFTokenizer:
        path = _check_dir(path)
        return cls(_auto().AutoTokenizer.from_pretrained(str(path), local_files_only=True), context_length)

    def save(self, directory: str | Path) -> None:
        """The HF tokenizer's own files (HFTokenizer.from_pretrained reads them back)."""
        self.tokenizer.save_pretrained(str(directory))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if int(i) != self.end_token_id]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool = True
    ) -> torch.Tensor:
        """(N, ctx) ids: HF ids of [CLS] text [SEP], the end marker, zeros. Too long: truncated (the HF
        way, keeping [SEP]) when `truncate`, else a ValueError."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ctx = context_length or self.context_length
        out = torch.zeros(len(texts), ctx, dtype=torch.long)
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=truncate, max_length=ctx - 1)[
            "input_ids"
        ]
        for i, ids in enumerate(enc):
            if len(ids) > ctx - 1:
                raise ValueError(
                    f"text {i} has {len(ids)} tokens, more than the context of {ctx - 1} "
                    "(+ end marker); pass truncate=True"
                )
            out[i, : len(ids)] = torch.tensor(ids)
            out[i, len(ids)] = self.end_token_id
        return out


class HFTextEncoder(nn.Module):
    """A HF encoder (BERT, MiniLM, RoBERTa, ...) + pooling + linear projection: tokens (N, T) -> (N, D)."""

    def __init__(
        self,
        model: nn.Module,
        embed_dim: int,
        end_token_id: int,
        pooling: Pooling = "mean",
        pad_token_id: int = 0,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.model = model
        self.pooling, self.end_token_id, self.pad_token_id = pooling, end_token_id, pad_token_id
        self.width = model.config.hidden_size
        self.context_length = getattr(model.config, "max_position_embeddings", 512) + 1
        self.proj = nn.Linear(self.width, embed_dim, bias=False)
        self.init_weights()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, embed_dim: int, pooling: Pooling = "mean", pretrained: bool = True
    ) -> HFTextEncoder:
        """From a local HF directory; pretrained=False builds the same architecture randomly initialised
        (the `u` policy). The tokenizer in the same directory defines the end marker id."""
        path = _check_dir(path)
        tf = _auto()
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
        kwargs = (
            {"add_pooling_layer": False} if config.model_type in ("bert", "roberta", "xlm-roberta") else {}
        )
        if pretrained:
            try:  # transformers reads pytorch_model.bin with torch.load(weights_only=True): never code
                model = tf.AutoModel.from_pretrained(str(path), local_files_only=True, **kwargs)
            except pickle.UnpicklingError as e:
                raise ValueError(
                    f"{path}: its pytorch_model.bin is not a plain state dict (torch.load with "
                    f"weights_only=True refused it: {_first_line(e)}); use model.safetensors instead"
                ) from None
        else:
            model = tf.AutoModel.from_config(config, **kwargs)
        tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        return cls(model.float(), embed_dim, len(tok), pooling, pad)

    def spec(self) -> dict:
        """What a checkpoint directory records to rebuild this tower (with the HF config saved beside it)."""
        return {
            "kind": "hf",
            "model_type": self.model.config.model_type,
            "pooling": self.pooling,
            "embed_dim": self.proj.out_features,
        }

    def init_weights(self) -> None:
        """Only the projection (the pretrained encoder keeps its weights); CLIP's text-projection std."""
        nn.init.normal_(self.proj.weight, std=self.width**-0.5)

    # Tower contract (models/towers.py).
    def blocks(self) -> list[nn.Module]:
        """The HF encoder's layers (BERT-family models keep them in `encoder.layer`, others in
        `encoder.layers`)."""
        enc = getattr(self.model, "encoder", None)
        layers = getattr(enc, "layer", None) or getattr(enc, "layers", None)
        if layers is None:
            raise TypeError(f"{type(self.model).__name__}: no encoder.layer list to unlock blocks of")
        return list(layers)

    def head(self) -> list[nn.Parameter]:
        return list(self.proj.parameters())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """HF's own per-layer checkpointing, non-reentrant as for clipforge's towers."""
        m = self.model
        if not m.supports_gradient_checkpointing:
            if enable:
                raise ValueError(f"{type(m).__name__} does not support gradient checkpointing")
            return
        kwargs = {"use_reentrant": False}
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5 renamed the methods
            if enable:
                m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                m.activation_checkpointing_disable()
        elif enable:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            m.gradient_checkpointing_disable()

    def split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """clipforge tokens (N, T) -> HF (input_ids, attention_mask), (N, T') cut at the longest marker."""
        if tokens.dim() != 2:
            raise ValueError(f"token ids must be (N, T), got shape {tuple(tokens.shape)}")
        end = tokens.argmax(dim=-1)  # (N,) the marker (the largest id)
        if not bool((tokens.gather(1, end[:, None]) == self.end_token_id).all()):
            raise ValueError(
                f"text tokens lack the end marker {self.end_token_id}: "
                "tokenize with HFTokenizer of the same directory"
            )
        T = int(end.max())
        ids = tokens[:, :T]
        mask = torch.arange(T, device=tokens.device)[None] < end[:, None]  # (N, T)
        return ids.masked_fill(~mask, self.pad_token_id), mask.long()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids, mask = self.split(tokens)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, T, w)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # mean over real tokens (sentence-transformers' mean pooling)
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return self.proj(pooled)  # (N, D)


def is_hf_text_dir(path: str | Path) -> bool:
    """A local HF directory of a non-CLIP encoder (config.json with a model_type, no clipforge format)."""
    import json

    f = Path(path) / "config.json"
    if not f.is_file():
        return False
    spec = json.loads(f.read_text(encoding="utf-8"))
    return "model_type" in spec and spec.get("model_type") != "clip" and spec.get("format") is None
