"""clipforge <-> OpenAI checkpoint layout (also what OpenCLIP writes for the OpenAI architectures).

The OpenAI layout (see reference/openai_state_dict_keys.txt) differs from clipforge's only in names:
`attn.in_proj_weight` is our fused `attn.qkv` ([q; k; v] rows), `mlp.c_fc/c_proj` our `mlp.fc/proj`,
`text_projection` our `text.proj`, `visual.conv1` (ViT) our `visual.patch_embed`, `downsample.0/1`
our `downsample.conv/bn`. Tensors are copied unchanged, so conversion is lossless both ways.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict

import torch

from ..config import PRESETS, CLIPConfig, TextConfig, VisionConfig
from .keys import check_shapes, meta_state_dict, shapes_of

# Entries OpenAI's TorchScript archives carry next to the weights; they are not weights.
OPENAI_SCALAR_KEYS = ("input_resolution", "context_length", "vocab_size")

# clipforge key -> OpenAI key, applied in order.
_RENAMES = [
    (r"^text\.token_embedding\.", "token_embedding."),
    (r"^text\.pos_embed$", "positional_embedding"),
    (r"^text\.proj$", "text_projection"),
    (r"^text\.ln_final\.", "ln_final."),
    (r"^text\.transformer\.", "transformer."),
    (r"^visual\.patch_embed\.", "visual.conv1."),
    (r"^visual\.pos_embed$", "visual.positional_embedding"),
    (r"^visual\.attnpool\.pos_embed$", "visual.attnpool.positional_embedding"),
    (r"\.blocks\.(\d+)\.", r".resblocks.\1."),
    (r"\.attn\.qkv\.weight$", ".attn.in_proj_weight"),
    (r"\.attn\.qkv\.bias$", ".attn.in_proj_bias"),
    (r"\.attn\.out\.", ".attn.out_proj."),
    (r"\.mlp\.fc\.", ".mlp.c_fc."),
    (r"\.mlp\.proj\.", ".mlp.c_proj."),
    (r"\.downsample\.conv\.", ".downsample.0."),
    (r"\.downsample\.bn\.", ".downsample.1."),
]


def openai_key(clipforge_key: str) -> str:
    for pattern, repl in _RENAMES:
        clipforge_key = re.sub(pattern, repl, clipforge_key)
    return clipforge_key


def openai_key_map(cfg: CLIPConfig) -> dict[str, str]:
    """{clipforge key: OpenAI key} for every entry of the model's state dict (BatchNorm buffers included)."""
    keys = {k: openai_key(k) for k in meta_state_dict(cfg)}
    assert len(set(keys.values())) == len(keys), "OpenAI key renaming is not one-to-one"
    return keys


def openai_shapes(cfg: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the OpenAI-layout state dict of `cfg`, in clipforge's module order."""
    meta = meta_state_dict(cfg)
    return {openai_key(k): tuple(v.shape) for k, v in meta.items()}


def convert_clipforge_to_openai(
    state_dict: Mapping[str, torch.Tensor], cfg: CLIPConfig
) -> dict[str, torch.Tensor]:
    """clipforge state dict -> OpenAI layout (same tensors, renamed). Checks every key and shape."""
    cfg_shapes = shapes_of(meta_state_dict(cfg))
    check_shapes(state_dict, cfg_shapes, "clipforge state dict")
    return {openai_key(k): v for k, v in state_dict.items()}


def convert_openai_to_clipforge(
    state_dict: Mapping[str, torch.Tensor],
    cfg: CLIPConfig | None = None,
    what: str = "OpenAI-layout state dict",
) -> dict[str, torch.Tensor]:
    """OpenAI-layout state dict -> clipforge layout. The scalar entries of OpenAI's TorchScript archives
    (input_resolution, context_length, vocab_size) are dropped; every other key and shape is checked.
    `cfg` defaults to the architecture inferred from the tensor shapes; `what` names it in errors."""
    sd = {k: v for k, v in state_dict.items() if k not in OPENAI_SCALAR_KEYS}
    cfg = cfg or infer_config_from_openai(sd)
    keys = openai_key_map(cfg)
    meta = meta_state_dict(cfg)
    check_shapes(sd, {keys[k]: tuple(v.shape) for k, v in meta.items()}, what)
    return {k: sd[keys[k]] for k in meta}


# ------------------------------------------------------------------------------------------------
# architecture from tensor shapes (as OpenAI's clip.model.build_model)


def _need(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise KeyError(
            f"cannot infer the architecture: missing key {key!r} (is this an OpenAI-layout CLIP state dict?)"
        )
    return sd[key]


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of distinct integer indices right after `prefix` (e.g. 'transformer.resblocks.')."""
    return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})


def _vote(sd: Mapping[str, torch.Tensor], where: list[tuple[str, int]]) -> int:
    """The size most of the listed (key, dim) entries agree on. Reading one key alone would let a single
    mis-shaped tensor set the whole config, and the shape check would then blame every other key; with
    a vote the odd one out is what the check names."""
    sizes = [sd[k].shape[d] for k, d in where if k in sd and sd[k].dim() > d]
    if not sizes:
        _need(sd, where[0][0])
        raise KeyError(f"cannot infer the architecture: {where[0][0]!r} has too few dimensions")
    return Counter(sizes).most_common(1)[0][0]


def infer_config_from_openai(state_dict: Mapping[str, torch.Tensor]) -> CLIPConfig:
    """The CLIPConfig of an OpenAI-layout state dict, from its tensor shapes (ViT and ResNet towers).

    Heads are not visible in shapes; OpenAI's rule is used (width // 64; ResNet attention pool:
    width * 32 // 64), unless a tower's shapes equal a preset's tower, whose heads are then taken (so
    the tiny presets round-trip). The activation is OpenAI's QuickGELU (shapes cannot tell).
    """
    sd = state_dict
    if "visual.proj" in sd:
        conv1 = _need(sd, "visual.conv1.weight")  # (w, 3, p, p)
        patch = conv1.shape[-1]
        width = _vote(
            sd,
            [("visual.conv1.weight", 0), ("visual.class_embedding", 0), ("visual.positional_embedding", 1),
             ("visual.ln_pre.weight", 0), ("visual.ln_post.weight", 0), ("visual.proj", 0),
             ("visual.transformer.resblocks.0.ln_1.weight", 0)],
        )  # fmt: skip
        grid = round((_need(sd, "visual.positional_embedding").shape[0] - 1) ** 0.5)
        hidden = _need(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0]
        vision = VisionConfig(
            kind="vit",
            image_size=patch * grid,
            width=width,
            layers=_count(sd, "visual.transformer.resblocks."),
            heads=max(1, width // 64),
            patch_size=patch,
            mlp_ratio=hidden / width,
        )
    elif "visual.attnpool.positional_embedding" in sd:
        width = _need(sd, "visual.layer1.0.conv1.weight").shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = tuple(_count(sd, f"visual.layer{i}.") for i in (1, 2, 3, 4))
        vision = VisionConfig(
            kind="resnet", image_size=grid * 32, width=width, layers=layers, heads=max(1, width * 32 // 64)
        )
    else:
        raise KeyError(
            "cannot infer the image tower: neither 'visual.proj' (ViT) nor "
            f"'visual.attnpool.positional_embedding' (ResNet) is present; first keys: {list(sd)[:5]}"
        )
    _need(sd, "ln_final.weight")
    tw = _vote(
        sd,
        [("ln_final.weight", 0), ("ln_final.bias", 0), ("token_embedding.weight", 1),
         ("positional_embedding", 1), ("text_projection", 0), ("transformer.resblocks.0.ln_1.weight", 0)],
    )  # fmt: skip
    text = TextConfig(
        context_length=_need(sd, "positional_embedding").shape[0],
        vocab_size=_need(sd, "token_embedding.weight").shape[0],
        width=tw,
        heads=max(1, tw // 64),
        layers=_count(sd, "transformer.resblocks."),
        mlp_ratio=_need(sd, "transformer.resblocks.0.mlp.c_fc.weight").shape[0] / tw,
    )
    bias = sd.get("logit_bias")
    return CLIPConfig(
        embed_dim=_vote(
            sd, [("text_projection", 1), ("visual.proj", 1), ("visual.attnpool.c_proj.weight", 0)]
        ),
        vision=_match_preset_heads(vision, "vision"),
        text=_match_preset_heads(text, "text"),
        init_logit_bias=None if bias is None else float(bias),
    )


def _match_preset_heads(tower: VisionConfig | TextConfig, attr: str) -> VisionConfig | TextConfig:
    shape_fields = {f: v for f, v in asdict(tower).items() if f not in ("heads", "act")}
    for preset in PRESETS.values():
        known = getattr(preset, attr)
        if {f: v for f, v in asdict(known).items() if f not in ("heads", "act")} == shape_fields:
            return known
    return tower
