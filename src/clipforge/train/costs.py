"""What one sample costs in each tower, from the model config: parameters, FLOPs, activation memory.

The formulas behind `clipforge.train.plan` (which turns them into a run's memory per GPU and days).

Conventions (the usual ones, e.g. Kaplan et al. 2020, Korthikanti et al. 2022):
- FLOPs count multiply-adds as 2 and cover matrix products and convolutions only (norms, activations and
  softmax are a few percent); attention scores are counted in full even where causal. These are exactly the
  operations torch's FlopCounterMode counts, and tests/test_plan.py checks the formulas against it on the
  real modules, forward and backward.
- Backward = 2 x forward (gradients of inputs and of weights), except the first layer of the image tower,
  whose input gradient is never needed, and attention, whose flash backward recomputes the scores (2.5 x).
  Gradient checkpointing recomputes the forward once more.
- Activations: what one sample's forward keeps for the backward pass, in the autocast dtype (2 bytes) with
  fp32 copies where LayerNorm upcasts; checked against saved-tensor hooks in tests/test_plan.py.
"""

from __future__ import annotations

import torch

from ..config import CLIPConfig, TextConfig, VisionConfig
from ..models import create_model


# ------------------------------------------------------------------------------------------ parameters
def tower_params(cfg: CLIPConfig) -> dict[str, int]:
    """Parameters per tower, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = create_model(cfg)
    image = sum(p.numel() for p in model.visual.parameters())
    text = sum(p.numel() for p in model.text.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"image": image, "text": text, "other": total - image - text, "total": total}


# ------------------------------------------------------------------------------------------ FLOPs
def _transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
    """Forward FLOPs of `layers` pre-norm blocks over `tokens` tokens (per sample): q/k/v + output
    projections 8 T w^2, the MLP 4 r T w^2, scores and weighted values 4 T^2 w."""
    hidden = int(width * mlp_ratio)
    per_layer = 8 * tokens * width * width + 4 * tokens * width * hidden + 4 * tokens * tokens * width
    return layers * per_layer


def vision_tokens(v: VisionConfig, mask_ratio: float = 0.0) -> int:
    """Tokens a ViT's blocks see: the kept patches (FLIP keeps round((1 - r) g^2)) + the class token."""
    patches = v.grid_size**2
    return max(1, round(patches * (1.0 - mask_ratio))) + 1 if mask_ratio > 0 else patches + 1


def _resnet_layers(v: VisionConfig) -> tuple[list[tuple], list[list[tuple]]]:
    """The ModifiedResNet's layers as (kind, c_in, c_out, kernel, output side): the stem and each
    Bottleneck's list, in forward order. Kinds: 'conv' (then BN + ReLU), 'conv_bn' (BN, no ReLU),
    'pool' (avgpool), 'relu' (the block's final ReLU after the residual add)."""
    w, s = v.width, v.image_size // 2
    stem = [("conv", 3, w // 2, 3, s), ("conv", w // 2, w // 2, 3, s), ("conv", w // 2, w, 3, s)]
    s //= 2
    stem.append(("pool", w, w, 0, s))
    blocks, cin = [], w
    for i, depth in enumerate(v.layers):
        planes = w * 2**i
        for b in range(depth):
            stride = 2 if (i > 0 and b == 0) else 1
            s_out = s // stride
            block = [("conv", cin, planes, 1, s), ("conv", planes, planes, 3, s)]
            if stride > 1:
                block.append(("pool", planes, planes, 0, s_out))
            block.append(("conv_bn", planes, planes * 4, 1, s_out))
            if stride > 1:
                block.append(("pool", cin, cin, 0, s_out))
            if stride > 1 or cin != planes * 4:
                block.append(("conv_bn", cin, planes * 4, 1, s_out))
            block.append(("relu", planes * 4, planes * 4, 0, s_out))
            blocks.append(block)
            cin, s = planes * 4, s_out
    return stem, blocks


def _conv_flops(layers: list[tuple]) -> int:
    return sum(2 * s * s * cin * cout * k * k for _, cin, cout, k, s in layers)


def image_forward_flops(v: VisionConfig, embed_dim: int, mask_ratio: float = 0.0) -> int:
    """Forward FLOPs of one image through the image tower."""
    if v.kind == "vit":
        if mask_ratio and not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        patch = 2 * v.grid_size**2 * 3 * v.patch_size**2 * v.width  # the patch conv sees every patch
        tokens = vision_tokens(v, mask_ratio)
        return patch + _transformer_flops(tokens, v.width, v.layers, v.mlp_ratio) + 2 * v.width * embed_dim
    if mask_ratio > 0:
        raise ValueError("patch masking (mask_ratio > 0) needs a ViT image tower")
    stem, blocks = _resnet_layers(v)
    convs = _conv_flops(stem) + sum(_conv_flops(b) for b in blocks)
    c, n = v.width * 32, v.grid_size**2 + 1  # attention pool: one query (the mean token) over 1 + g^2
    pool = 2 * c * c + 2 * 2 * n * c * c + 4 * n * c + 2 * c * embed_dim
    return convs + pool


def text_forward_flops(t: TextConfig, embed_dim: int, tokens: int | None = None) -> int:
    """Forward FLOPs of one caption of `tokens` positions (default: the full context; the training step
    trims a batch to its longest caption, so real runs cost less)."""
    tokens = t.context_length if tokens is None else tokens
    return _transformer_flops(tokens, t.width, t.layers, t.mlp_ratio) + 2 * t.width * embed_dim


def attention_flops(cfg: CLIPConfig, mask_ratio: float = 0.0, text_tokens: int | None = None) -> int:
    """Forward FLOPs of the attention scores and weighted values (4 T^2 w per layer) of both towers: their
    backward costs 2.5 x, as flash attention recomputes the scores (Dao et al. 2022)."""
    v, t = cfg.vision, cfg.text
    if v.kind == "vit":
        img = 4 * vision_tokens(v, mask_ratio) ** 2 * v.width * v.layers
    else:
        img = 4 * (v.grid_size**2 + 1) * v.width * 32  # the attention pool's single query
    n = t.context_length if text_tokens is None else text_tokens
    return img + 4 * n * n * t.width * t.layers


def first_layer_flops(v: VisionConfig) -> int:
    """Forward FLOPs of the image tower's first layer (its backward skips the input gradient)."""
    if v.kind == "vit":
        return 2 * v.grid_size**2 * 3 * v.patch_size**2 * v.width
    return _conv_flops(_resnet_layers(v)[0][:1])


def flops_per_sample(
    cfg: CLIPConfig,
    mask_ratio: float = 0.0,
    text_tokens: int | None = None,
    grad_checkpointing: bool = False,
    batch: int = 1,
) -> dict[str, float]:
    """Forward, backward and training FLOPs of one image-text pair. `batch` adds the loss's share: the
    B x B similarity matrix costs 2 B D per sample forward (and twice that backward). Backward: 2 x
    forward, less the first layer's input gradient, plus flash attention's recomputed scores."""
    img = image_forward_flops(cfg.vision, cfg.embed_dim, mask_ratio)
    txt = text_forward_flops(cfg.text, cfg.embed_dim, text_tokens)
    loss = 2 * batch * cfg.embed_dim
    forward = img + txt + loss
    attn = attention_flops(cfg, mask_ratio, text_tokens)
    backward = 2 * forward - first_layer_flops(cfg.vision) + attn // 2
    recompute = img + txt if grad_checkpointing else 0
    return {
        "image_forward": img,
        "text_forward": txt,
        "loss_forward": loss,
        "forward": forward,
        "backward": backward,
        "recompute": recompute,
        "train": forward + backward + recompute,
    }


# ------------------------------------------------------------------------------------------ activations
def block_activation_elements(tokens: int, width: int, hidden: int, half: bool) -> int:
    """Elements one Transformer block saves for backward per sample (flash attention, no T^2 term):
    LayerNorm inputs 2 w, q/k/v + attention output + its reshaped copy 5 w, the qkv / fc inputs 2 w,
    MLP pre-activation and activation 2 h. Under autocast LayerNorm saves an fp32 copy of its half input
    (2 more half-width elements per norm: 4 w). Checked against saved-tensor hooks in tests/test_plan.py."""
    return tokens * (9 * width + 2 * hidden + (4 * width if half else 0))


def image_activation_bytes(
    v: VisionConfig, mask_ratio: float = 0.0, grad_checkpointing: bool = False, dtype_bytes: int = 2
) -> int:
    """Bytes one image's forward keeps for the backward pass. With checkpointing only each block's input
    is kept, plus one block's activations while it is recomputed."""
    half = dtype_bytes < 4
    if v.kind == "vit":
        tokens, hidden = vision_tokens(v, mask_ratio), int(v.width * v.mlp_ratio)
        block = block_activation_elements(tokens, v.width, hidden, half)
        stem = 3 * v.image_size**2 + tokens * v.width  # pixels, ln_pre's input
        blocks = v.layers * tokens * v.width + block if grad_checkpointing else v.layers * block
        return dtype_bytes * (stem + blocks)
    # ResNet: every conv -> BN -> ReLU keeps the BN input and the ReLU output (the next conv's input);
    # conv -> BN keeps the BN input; avgpool keeps its output (its input is already kept).
    per = {"conv": 2, "conv_bn": 1, "pool": 1, "relu": 1}

    def elements(layers: list[tuple]) -> int:
        return sum(per[kind] * cout * s * s for kind, _, cout, _, s in layers)

    stem, blocks = _resnet_layers(v)
    c, n = v.width * 32, v.grid_size**2 + 1
    fixed = 3 * v.image_size**2 + elements(stem) + 4 * n * c  # pixels, stem, attention pool (x, k, v, +pos)
    if grad_checkpointing:
        # checkpoint_sequential makes each block a segment but runs a stage's last one plainly: the other
        # blocks keep only their input, and one block at a time is recomputed in the backward pass
        total, start = fixed, 0
        for depth in v.layers:
            stage = blocks[start : start + depth]
            total += sum(b[0][1] * b[0][4] ** 2 for b in stage[:-1]) + elements(stage[-1])
            start += depth
        return dtype_bytes * (total + max(elements(b) for b in blocks))
    return dtype_bytes * (fixed + sum(elements(b) for b in blocks))


def text_activation_bytes(
    t: TextConfig, tokens: int | None = None, grad_checkpointing: bool = False, dtype_bytes: int = 2
) -> int:
    tokens = t.context_length if tokens is None else tokens
    block = block_activation_elements(tokens, t.width, int(t.width * t.mlp_ratio), dtype_bytes < 4)
    blocks = t.layers * tokens * t.width + block if grad_checkpointing else t.layers * block
    return dtype_bytes * blocks  # the embedding output is block 0's input
