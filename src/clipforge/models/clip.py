"""The two-tower CLIP model: image tower, text tower, linear projections, learned temperature."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIPConfig, get_config
from .text import TextTransformer
from .towers import build_image_tower


@dataclass
class CLIPOutput:
    """What `CLIP.forward` returns: L2-normalised features and the (clamped) logit scale."""

    image_features: torch.Tensor  # (N, D), unit norm
    text_features: torch.Tensor  # (M, D), unit norm
    logit_scale: torch.Tensor  # () = exp(learned log-scale), clamped to max_logit_scale
    logit_bias: torch.Tensor | None = None  # () for sigmoid-loss models

    def logits_per_image(self) -> torch.Tensor:
        """(N, M) scaled cosine similarities (+ bias)."""
        logits = self.logit_scale * self.image_features @ self.text_features.T
        return logits if self.logit_bias is None else logits + self.logit_bias


def check_pixels(pixels: object) -> None:
    """A one-line error for what `encode_image` cannot take (instead of torch's own from inside a conv)."""
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(
            "encode_image takes a (N, 3, H, W) float tensor of preprocessed images, got "
            f"{type(pixels).__name__}: torch.stack([preprocess(image) for image in images])"
        )
    if pixels.dim() == 3:
        raise ValueError(
            f"encode_image takes a batch (N, 3, H, W), got one image {tuple(pixels.shape)}: "
            "pixels.unsqueeze(0)"
        )
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(
            f"encode_image takes (N, 3, H, W) pixels (channels first), got {tuple(pixels.shape)}"
        )
    if not pixels.is_floating_point():  # raw 0-255 values would give features, all meaningless
        raise TypeError(
            f"encode_image takes normalised float pixels (the output of preprocess), got {pixels.dtype}"
        )


def check_tokens(tokens: object) -> None:
    """A one-line error for what `encode_text` cannot take: strings (not yet tokenized), float ids."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(
            f"encode_text takes a (N, T) tensor of token ids, got {type(tokens).__name__}: "
            "tokenize the texts first, tokenizer(texts)"
        )
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"encode_text takes integer token ids, got {tokens.dtype}")


class CLIP(nn.Module):
    """visual_tower / text_tower: prebuilt (e.g. pretrained, for LiT) towers used instead of building
    them from cfg; they must map to cfg.embed_dim features and are never re-initialised here."""

    def __init__(
        self, cfg: CLIPConfig, visual_tower: nn.Module | None = None, text_tower: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.config = cfg
        self.visual = (
            visual_tower if visual_tower is not None else build_image_tower(cfg.vision, cfg.embed_dim)
        )
        self.text = text_tower if text_tower is not None else TextTransformer(cfg.text, cfg.embed_dim)
        self._prebuilt = (visual_tower is not None, text_tower is not None)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = (
            None if cfg.init_logit_bias is None else nn.Parameter(torch.tensor(cfg.init_logit_bias))
        )
        # On the meta device (checkpoint loading, planning) there are no values to draw: the ~200 init
        # calls would only cost dispatch time (a quarter second for ViT-B-32 on every `load`).
        if not self.logit_scale.is_meta:
            self.init_weights()

    def init_weights(self) -> None:
        """OpenAI's initialisation (of the towers built here, not of prebuilt ones)."""
        if not self._prebuilt[0]:
            self.visual.init_weights()
        if not self._prebuilt[1]:
            self.text.init_weights()
        with torch.no_grad():
            self.logit_scale.fill_(self.config.init_logit_scale)
            if self.logit_bias is not None:
                self.logit_bias.fill_(self.config.init_logit_bias)

    def encode_image(
        self, pixels: torch.Tensor, normalize: bool = False, *, mask_ratio: float = 0.0
    ) -> torch.Tensor:
        """(N, 3, H, W) normalised pixels -> (N, D) features: unnormalised as OpenAI CLIP, or L2-normalised
        with `normalize=True` (OpenCLIP's keyword, in the same place).

        `pixels` is a float batch of `preprocess` outputs: `torch.stack([preprocess(im) for im in ims])`.
        Gradients are tracked as for any module: wrap inference in `torch.inference_mode()`."""
        check_pixels(pixels)
        feats = self.visual(pixels, mask_ratio=mask_ratio)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(N, T) token ids (`tokenizer(texts)`) -> (N, D) features: unnormalised as OpenAI CLIP, or
        L2-normalised with `normalize=True` (OpenCLIP's keyword)."""
        check_tokens(tokens)
        feats = self.text(tokens)
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, mask_ratio: float = 0.0) -> CLIPOutput:
        """`mask_ratio` > 0 drops that share of image patches at random (FLIP training, ViT towers only)."""
        return CLIPOutput(
            image_features=self.encode_image(pixels, normalize=True, mask_ratio=mask_ratio),
            text_features=self.encode_text(tokens, normalize=True),
            logit_scale=self.logit_scale.exp().clamp(max=self.config.max_logit_scale),
            logit_bias=self.logit_bias,
        )

    def clamp_logit_scale(self) -> None:
        """Keep the temperature within (0, max_logit_scale]; call after each optimizer step."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, torch.log(torch.tensor(self.config.max_logit_scale)).item())

    def set_grad_checkpointing(self, enable: bool = True, vision: bool = True, text: bool = True) -> None:
        """Recompute each block's activations in the backward pass (the towers' own switch)."""
        if vision:
            self.visual.set_grad_checkpointing(enable)
        if text:
            self.text.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay: gains, biases, embeddings and the temperature."""
        names = set()
        for mod_name, mod in self.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                # The patch-embedding convolution is a linear map, decayed like every other matrix.
                if p.ndim < 2 or isinstance(mod, nn.Embedding) or p_name in ("pos_embed", "class_embedding"):
                    names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
        return names

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def context_length(self) -> int:
        return self.config.text.context_length


def create_model(name_or_config: str | CLIPConfig) -> CLIP:
    """A randomly initialised CLIP (OpenAI's init) from a preset name or a `CLIPConfig`."""
    return CLIP(get_config(name_or_config))
