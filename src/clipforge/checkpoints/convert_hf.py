"""clipforge <-> HF transformers `CLIPModel` (ViT image towers only): state dicts and config.json.

HF splits the fused attention projection into q/k/v Linears, stores the two joint-space projections
as bias-free Linears (weights transposed: (D, w)), spells `ln_pre` as `pre_layrnorm`, and keeps
positions in `nn.Embedding`s. Every tensor is copied, split, concatenated or transposed exactly,
so conversion is lossless both ways.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ..config import CLIPConfig, TextConfig, VisionConfig
from .keys import check_shapes, meta_state_dict

# Buffers older transformers versions saved; they carry no weights.
HF_IGNORED_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

_FIXED = {
    "logit_scale": "logit_scale",
    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text.pos_embed": "text_model.embeddings.position_embedding.weight",
    "text.ln_final.weight": "text_model.final_layer_norm.weight",
    "text.ln_final.bias": "text_model.final_layer_norm.bias",
    "text.proj": "text_projection.weight",  # transposed
    "visual.patch_embed.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.pos_embed": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",  # transposed
}
_TRANSPOSED = ("text.proj", "visual.proj")
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out": "self_attn.out_proj",
    "mlp.fc": "mlp.fc1",
    "mlp.proj": "mlp.fc2",
}
_BLOCK_RE = re.compile(r"^(text|visual)\.transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)$")


def _hf_keys(key: str) -> list[str]:
    """HF key(s) holding clipforge `key`: three for a fused q/k/v projection, else one."""
    if key in _FIXED:
        return [_FIXED[key]]
    m = _BLOCK_RE.match(key)
    if m is None:
        raise ValueError(f"no HF CLIPModel equivalent for {key!r} (HF CLIP has ViT image towers only)")
    tower, n, module, param = m.groups()
    prefix = f"{'text_model' if tower == 'text' else 'vision_model'}.encoder.layers.{n}."
    if module == "attn.qkv":
        return [f"{prefix}self_attn.{p}_proj.{param}" for p in "qkv"]
    if module not in _BLOCK:
        raise ValueError(f"no HF CLIPModel equivalent for {key!r}")
    return [f"{prefix}{_BLOCK[module]}.{param}"]


def _to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        names = _hf_keys(k)
        parts = v.chunk(3, dim=0) if len(names) == 3 else [v.t() if k in _TRANSPOSED else v]
        out.update(zip(names, parts))
    return out


def _require_vit(cfg: CLIPConfig) -> None:
    if cfg.vision.kind != "vit":
        raise ValueError("HF transformers CLIPModel has ViT image towers only; this model has a ResNet tower")
    if cfg.init_logit_bias is not None:
        raise ValueError("HF CLIPModel has no logit_bias; this model is a sigmoid-loss (SigLIP-style) model")


def convert_clipforge_to_hf(
    state_dict: Mapping[str, torch.Tensor], cfg: CLIPConfig
) -> dict[str, torch.Tensor]:
    """clipforge state dict -> HF CLIPModel state dict (contiguous tensors). Checks every key and shape."""
    _require_vit(cfg)
    check_shapes(
        state_dict, {k: tuple(v.shape) for k, v in meta_state_dict(cfg).items()}, "clipforge state dict"
    )
    return {k: v.contiguous() for k, v in _to_hf(state_dict).items()}


def convert_hf_to_clipforge(
    state_dict: Mapping[str, torch.Tensor], cfg: CLIPConfig, what: str = "HF CLIPModel state dict"
) -> dict[str, torch.Tensor]:
    """HF CLIPModel state dict -> clipforge layout; `cfg` from `config_from_hf(config.json)`; `what` names
    the state dict in errors."""
    _require_vit(cfg)
    sd = {k: v for k, v in state_dict.items() if k not in HF_IGNORED_KEYS}
    meta = meta_state_dict(cfg)
    check_shapes(sd, {k: tuple(v.shape) for k, v in _to_hf(meta).items()}, what)
    out = {}
    for k in meta:
        names = _hf_keys(k)
        if len(names) == 3:
            out[k] = torch.cat([sd[n] for n in names], dim=0)
        else:
            v = sd[names[0]]
            out[k] = v.t().contiguous() if k in _TRANSPOSED else v
    return out


# ------------------------------------------------------------------------------------------------
# config.json


def config_from_hf(hf: Mapping[str, Any]) -> CLIPConfig:
    """HF `CLIPConfig` dict (config.json) -> clipforge CLIPConfig. Raises on what clipforge cannot express."""
    if hf.get("model_type", "clip") != "clip":
        raise ValueError(f"not a HF CLIP config: model_type={hf.get('model_type')!r}")
    t, v = dict(hf.get("text_config") or {}), dict(hf.get("vision_config") or {})
    for name, sub in (("text_config", t), ("vision_config", v)):
        missing = [
            k
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if k not in sub
        ]
        if missing:
            raise ValueError(f"HF config.json {name} lacks {', '.join(missing)}")
        eps = sub.get("layer_norm_eps", 1e-5)
        if abs(eps - 1e-5) > 1e-12:
            raise ValueError(f"HF config.json {name}.layer_norm_eps={eps}; clipforge's LayerNorm uses 1e-5")
    vocab = t.get("vocab_size", 49408)
    eos = t.get("eos_token_id", 2)
    if eos not in (2, vocab - 1):
        # HF pools at the first eos_token_id (argmax when eos_token_id == 2, its legacy rule); clipforge
        # pools at the largest id. Both agree only when the EOT is the largest id.
        raise ValueError(
            f"HF text_config.eos_token_id={eos}: clipforge pools at the largest token id ({vocab - 1}); "
            "a model pooling at another token cannot be expressed"
        )
    return CLIPConfig(
        embed_dim=hf.get("projection_dim", 512),
        vision=VisionConfig(
            kind="vit",
            image_size=v.get("image_size", 224),
            width=v["hidden_size"],
            layers=v["num_hidden_layers"],
            heads=v["num_attention_heads"],
            patch_size=v.get("patch_size", 32),
            mlp_ratio=v["intermediate_size"] / v["hidden_size"],
            act=_act(v.get("hidden_act", "quick_gelu")),
        ),
        text=TextConfig(
            context_length=t.get("max_position_embeddings", 77),
            vocab_size=vocab,
            width=t["hidden_size"],
            heads=t["num_attention_heads"],
            layers=t["num_hidden_layers"],
            mlp_ratio=t["intermediate_size"] / t["hidden_size"],
            act=_act(t.get("hidden_act", "quick_gelu")),
        ),
        init_logit_scale=hf.get("logit_scale_init_value", 2.6592),
    )


def _act(name: str) -> str:
    if name not in ("quick_gelu", "gelu"):
        raise ValueError(f"HF hidden_act {name!r} is not supported (clipforge has 'quick_gelu' and 'gelu')")
    return name


def config_to_hf(cfg: CLIPConfig) -> dict[str, Any]:
    """clipforge CLIPConfig -> HF config.json dict that `transformers.CLIPModel.from_pretrained` reads."""
    _require_vit(cfg)
    t, v = cfg.text, cfg.vision
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.init_logit_scale,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.width,
            "intermediate_size": int(t.width * t.mlp_ratio),
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length,
            "hidden_act": t.act,
            "layer_norm_eps": 1e-5,
            "projection_dim": cfg.embed_dim,
            "bos_token_id": t.vocab_size - 2,  # SOT
            "eos_token_id": t.vocab_size - 1,  # EOT, the largest id: HF then pools where clipforge does
            "pad_token_id": 1,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.width,
            "intermediate_size": int(v.width * v.mlp_ratio),
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "num_channels": 3,
            "hidden_act": v.act,
            "layer_norm_eps": 1e-5,
            "projection_dim": cfg.embed_dim,
        },
    }
