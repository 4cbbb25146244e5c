"""What a training run costs, from the model config: parameters, FLOPs, memory per device, traffic, days.

The CLIP paper (sec. 2.5): 32 epochs over 400M pairs (12.8B samples) at batch 32,768; "the largest
ResNet model, RN50x64, took 18 days to train on 592 V100 GPUs while the largest Vision Transformer took
12 days on 256 V100 GPUs". `plan_run` turns a preset, a batch, a sample count and a GPU fleet into the
numbers behind such a sentence, and `paper_runs` checks the two quoted runs against it.

Conventions (the usual ones, e.g. Kaplan et al. 2020, Korthikanti et al. 2022):
- FLOPs count multiply-adds as 2 and cover matrix products and convolutions only (norms, activations and
  softmax are a few percent); attention scores are counted in full even where causal. These are exactly the
  operations torch's FlopCounterMode counts, and tests/test_plan.py checks the formulas against it on the
  real modules, forward and backward.
- Backward = 2 x forward (gradients of inputs and of weights), except the first layer of the image tower,
  whose input gradient is never needed, and attention, whose flash backward recomputes the scores (2.5 x).
  Gradient checkpointing recomputes the forward once more.
- Memory: fp32 master weights, fp32 gradients, AdamW's two fp32 moments (16 bytes per parameter; the paper
  kept the Adam moments in half precision), activations in the autocast dtype (2 bytes) with fp32 copies
  where LayerNorm upcasts, the per-rank B x B loss buffers of the objective
  (clipforge.loss.OBJECTIVES[...].bytes_per_logit) and the gathered features.
- Time: total FLOPs / (GPUs x peak x utilisation). Peak = the dense 16-bit tensor-core figure of the GPU's
  data sheet (`GPUS`); utilisation (model FLOPs utilisation, MFU) is an assumption the caller states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import PAPER_PRESETS, CLIPConfig, TextConfig, VisionConfig, get_config
from ..loss import get_objective
from ..models import create_model
from .global_loss import gather_bytes_per_step


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense fp16/bf16 tensor-core FLOP/s
    memory_bytes: int
    source: str


GiB = 1024**3
# Dense 16-bit tensor-core peaks (no 2:4 sparsity) of the SXM parts, from NVIDIA's data sheets.
GPUS: dict[str, GPU] = {
    "v100": GPU("V100 SXM2 32GB", 125e12, 32 * GiB, "NVIDIA Tesla V100 data sheet: 125 TFLOPS tensor"),
    "a100": GPU("A100 SXM 80GB", 312e12, 80 * GiB, "NVIDIA A100 data sheet: 312 TFLOPS BF16 dense"),
    "h100": GPU("H100 SXM 80GB", 989e12, 80 * GiB, "NVIDIA H100 data sheet: 1979 TFLOPS BF16 with sparsity"),
    "h200": GPU("H200 SXM 141GB", 989e12, 141 * 10**9, "NVIDIA H200 data sheet: as H100, 141 GB HBM3e"),
}

# The two runs the paper quotes (sec. 2.5), 32 epochs of 400M pairs at batch 32,768.
PAPER_RUNS = (
    {"preset": "RN50x64", "gpus": 592, "gpu": "v100", "days": 18.0},
    {"preset": "ViT-L-14", "gpus": 256, "gpu": "v100", "days": 12.0},
)
PAPER_SAMPLES = 32 * 400e6
FLIP_MASK = 0.5  # the activation table always shows FLIP's 50% masking beside the plan's own ratio
PAPER_BATCH = 32768


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


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class PlanSettings:
    batch: int = PAPER_BATCH  # global contrastive batch
    samples: float = PAPER_SAMPLES  # image-text pairs seen in the whole run
    gpus: int = 256
    gpu: str = "v100"
    utilisation: float = 0.3  # assumed model FLOPs utilisation
    mask_ratio: float = 0.0  # FLIP patch dropping (ViT towers)
    text_tokens: int | None = None  # positions per caption (default: the full context)
    loss: str = "clip"
    micro_batch: int | None = None  # per-device forward batch (default: batch / gpus, no accumulation)
    fsdp: bool = False  # shard weights, gradients and optimizer state over the GPUs


def _check(s: PlanSettings) -> None:
    if s.gpu not in GPUS:
        raise ValueError(f"unknown gpu {s.gpu!r}; choose one of {', '.join(GPUS)}")
    if s.gpus < 1 or s.batch < s.gpus:
        raise ValueError(f"need 1 <= gpus <= batch, got gpus={s.gpus} batch={s.batch}")
    if not 0.0 < s.utilisation <= 1.0:
        raise ValueError(f"utilisation must be in (0, 1], got {s.utilisation}")
    if s.samples <= 0:
        raise ValueError(f"samples must be positive, got {s.samples}")


def plan_run(preset: str | CLIPConfig, settings: PlanSettings = PlanSettings()) -> dict:
    """Every number of the plan for one model and run, as plain data (JSON-ready)."""
    _check(settings)
    cfg = get_config(preset)
    mask = settings.mask_ratio if cfg.vision.kind == "vit" else 0.0
    gpu = GPUS[settings.gpu]
    params = tower_params(cfg)
    local = settings.batch // settings.gpus
    micro = settings.micro_batch or local
    flops = flops_per_sample(cfg, mask, settings.text_tokens, batch=settings.batch)
    flops_ckpt = flops_per_sample(cfg, mask, settings.text_tokens, True, batch=settings.batch)

    shard = settings.gpus if settings.fsdp else 1
    n = params["total"] / shard
    weights, grads, adam = 4 * n, 4 * n, 8 * n
    act = {}
    for ckpt in (False, True):
        for r in sorted({0.0, mask, FLIP_MASK if cfg.vision.kind == "vit" else 0.0}):
            per = image_activation_bytes(cfg.vision, r, ckpt) + text_activation_bytes(
                cfg.text, settings.text_tokens, ckpt
            )
            act[f"{'ckpt' if ckpt else 'full'}_mask{r:g}"] = per * micro
    obj = get_objective(settings.loss)
    loss_buffers = obj.bytes_per_logit * local * settings.batch  # n x M logits of this rank
    gathered = 2 * settings.batch * cfg.embed_dim * 4 * 2  # all image + text features and their grads
    traffic = gather_bytes_per_step(settings.batch, cfg.embed_dim, settings.gpus, settings.loss)
    state = weights + grads + adam
    fixed = state + loss_buffers + gathered
    total_flops = {
        "plain": settings.samples * flops["train"],
        "checkpointed": settings.samples * flops_ckpt["train"],
    }
    rate = settings.gpus * gpu.peak_flops * settings.utilisation
    days = {k: v / rate / 86400 for k, v in total_flops.items()}
    return {
        "preset": preset if isinstance(preset, str) else "custom",
        "settings": {**settings.__dict__, "mask_ratio": mask, "micro_batch": micro},
        "gpu": gpu.__dict__,
        "params": params,
        "flops_per_sample": flops,
        "flops_per_sample_checkpointed": flops_ckpt,
        "memory_bytes": {
            "weights": weights,
            "gradients": grads,
            "adamw_state": adam,
            "activations": act,
            "loss_buffers": loss_buffers,
            "gathered_features": gathered,
            "total_plain": fixed + act["full_mask0"],
            "total_checkpointed": fixed + act[f"ckpt_mask{mask:g}"],
            "fits_plain": fixed + act["full_mask0"] <= gpu.memory_bytes,
            "fits_checkpointed": fixed + act[f"ckpt_mask{mask:g}"] <= gpu.memory_bytes,
        },
        "all_gather_per_step": traffic,
        "steps": math.ceil(settings.samples / settings.batch),
        "total_flops": total_flops,
        "days": days,
    }


def implied_utilisation(plan: dict, days: float, checkpointed: bool = True) -> float:
    """The utilisation at which `plan`'s run takes `days`."""
    s = plan["settings"]
    flops = plan["total_flops"]["checkpointed" if checkpointed else "plain"]
    return flops / (s["gpus"] * plan["gpu"]["peak_flops"] * days * 86400)


def paper_runs(utilisation: float = 0.3) -> list[dict]:
    """The paper's two quoted runs: predicted days at `utilisation` and the utilisation the quoted days
    imply (both with and without gradient checkpointing, which the paper used)."""
    rows = []
    for run in PAPER_RUNS:
        settings = PlanSettings(gpus=run["gpus"], gpu=run["gpu"], utilisation=utilisation)
        plan = plan_run(run["preset"], settings)
        rows.append(
            {
                **run,
                "predicted_days_checkpointed": plan["days"]["checkpointed"],
                "predicted_days_plain": plan["days"]["plain"],
                "ratio_checkpointed": plan["days"]["checkpointed"] / run["days"],
                "implied_utilisation_checkpointed": implied_utilisation(plan, run["days"], True),
                "implied_utilisation_plain": implied_utilisation(plan, run["days"], False),
                "micro_batch": plan["settings"]["micro_batch"],
                "memory_checkpointed_bytes": plan["memory_bytes"]["total_checkpointed"],
                "gpu_memory_bytes": plan["gpu"]["memory_bytes"],
            }
        )
    return rows


def preset_table(settings: PlanSettings = PlanSettings()) -> list[dict]:
    """`plan_run` of all nine paper presets with the same settings."""
    return [plan_run(name, settings) for name in PAPER_PRESETS]


# ------------------------------------------------------------------------------------------ reports
def _gb(x: float) -> str:
    return f"{x / GiB:.1f}"


def plan_rows(plans: list[dict]) -> list[dict]:
    """One flat row per plan: the columns of the Markdown table."""
    rows = []
    for p in plans:
        m, f = p["memory_bytes"], p["flops_per_sample"]
        act = m["activations"]
        rows.append(
            {
                "preset": p["preset"],
                "image_params_M": p["params"]["image"] / 1e6,
                "text_params_M": p["params"]["text"] / 1e6,
                "image_fwd_GFLOPs": f["image_forward"] / 1e9,
                "text_fwd_GFLOPs": f["text_forward"] / 1e9,
                "train_GFLOPs_per_sample": p["flops_per_sample_checkpointed"]["train"] / 1e9,
                "state_GiB": (m["weights"] + m["gradients"] + m["adamw_state"]) / GiB,
                "act_GiB": m["activations"]["full_mask0"] / GiB,
                "act_ckpt_GiB": m["activations"]["ckpt_mask0"] / GiB,
                "act_ckpt_masked_GiB": act.get(f"ckpt_mask{FLIP_MASK:g}", act["ckpt_mask0"]) / GiB,
                "loss_GiB": m["loss_buffers"] / GiB,
                "gather_MiB": p["all_gather_per_step"]["received_bytes"] / 2**20,
                "days": p["days"]["checkpointed"],
            }
        )
    return rows


def plan_markdown(plans: list[dict], paper: list[dict] | None = None) -> str:
    """The plans as a Markdown table, plus the paper's two runs against the model when given."""
    s = plans[0]["settings"]
    gpu = plans[0]["gpu"]
    mask = max(p["settings"]["mask_ratio"] for p in plans)
    head = (
        f"Batch {s['batch']:,} over {s['gpus']} x {gpu['name']} (micro-batch {s['micro_batch']} per GPU), "
        f"{s['samples']:.3g} samples, utilisation {s['utilisation']:.0%} of {gpu['peak_flops'] / 1e12:.0f} "
        f"TFLOP/s, masking {mask:g} (ViTs), loss {s['loss']}; train FLOPs and days with gradient "
        "checkpointing; memory per GPU in GiB (state = fp32 weights + grads + AdamW moments"
        f"{', sharded (FSDP)' if s['fsdp'] else ''}).\n"
    )
    cols = [
        ("preset", "preset", "{}"),
        ("image_params_M", "image M params", "{:.1f}"),
        ("text_params_M", "text M params", "{:.1f}"),
        ("image_fwd_GFLOPs", "image fwd GFLOPs", "{:.1f}"),
        ("text_fwd_GFLOPs", "text fwd GFLOPs", "{:.1f}"),
        ("train_GFLOPs_per_sample", "train GFLOPs/sample", "{:.0f}"),
        ("state_GiB", "state", "{:.2f}"),
        ("act_GiB", "activations", "{:.1f}"),
        ("act_ckpt_GiB", "act. ckpt", "{:.2f}"),
        ("act_ckpt_masked_GiB", f"act. ckpt+mask {FLIP_MASK:g}", "{:.2f}"),
        ("loss_GiB", "B x B loss", "{:.2f}"),
        ("gather_MiB", "all-gather MiB/step", "{:.0f}"),
        ("days", "days", "{:.1f}"),
    ]
    lines = [head, "| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in plan_rows(plans):
        lines.append("| " + " | ".join(fmt.format(row[k]) for k, _, fmt in cols) + " |")
    if paper:
        lines += [
            "",
            "The paper's runs (32 epochs x 400M = 12.8B samples, batch 32,768, V100s):",
            "",
            "| run | per-GPU batch | memory/GPU ckpt (GiB) | quoted days | predicted days (ckpt) | "
            "predicted / quoted | implied utilisation (ckpt) | implied utilisation (no ckpt) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in paper:
            lines.append(
                f"| {r['preset']} on {r['gpus']} {r['gpu'].upper()} | {r['micro_batch']} | "
                f"{_gb(r['memory_checkpointed_bytes'])} of {_gb(r['gpu_memory_bytes'])} | {r['days']:.0f} | "
                f"{r['predicted_days_checkpointed']:.1f} | {r['ratio_checkpointed']:.2f} | "
                f"{r['implied_utilisation_checkpointed']:.1%} | {r['implied_utilisation_plain']:.1%} |"
            )
    return "\n".join(lines) + "\n"
