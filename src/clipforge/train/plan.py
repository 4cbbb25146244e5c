"""What a training run costs, from the model config: parameters, FLOPs, memory per device, traffic, days.

The CLIP paper (sec. 2.5): 32 epochs over 400M pairs (12.8B samples) at batch 32,768; "the largest
ResNet model, RN50x64, took 18 days to train on 592 V100 GPUs while the largest Vision Transformer took
12 days on 256 V100 GPUs". `plan_run` turns a preset, a batch, a sample count and a GPU fleet into the
numbers behind such a sentence, and `paper_runs` checks the two quoted runs against it.

Per-sample FLOPs and activation bytes come from train/costs.py (its docstring gives the FLOP counting
conventions; its names are importable from here too). On top of them:
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

from ..config import PAPER_PRESETS, CLIPConfig, get_config
from ..loss import get_objective
from .costs import (
    attention_flops,
    block_activation_elements,
    first_layer_flops,
    flops_per_sample,
    image_activation_bytes,
    image_forward_flops,
    text_activation_bytes,
    text_forward_flops,
    tower_params,
    vision_tokens,
)
from .global_loss import gather_bytes_per_step

__all__ = [  # the cost formulas (train/costs.py) stay importable from here
    "FLIP_MASK",
    "GPU",
    "GPUS",
    "PAPER_BATCH",
    "PAPER_RUNS",
    "PAPER_SAMPLES",
    "GiB",
    "PlanSettings",
    "attention_flops",
    "block_activation_elements",
    "first_layer_flops",
    "flops_per_sample",
    "image_activation_bytes",
    "image_forward_flops",
    "implied_utilisation",
    "paper_runs",
    "plan_markdown",
    "plan_rows",
    "plan_run",
    "preset_table",
    "text_activation_bytes",
    "text_forward_flops",
    "tower_params",
    "vision_tokens",
]


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
    if not (s.samples > 0 and math.isfinite(s.samples)):  # inf: a traceback in math.ceil; nan: no sentence
        raise ValueError(f"samples must be a positive number, got {s.samples}")
    local = s.batch // s.gpus
    if s.micro_batch is not None and not 1 <= s.micro_batch <= local:  # 0 meant "the default", silently
        raise ValueError(f"micro_batch must be in [1, batch / gpus = {local}], got {s.micro_batch}")
    if s.text_tokens is not None and s.text_tokens < 1:  # 0 or less gave zero or negative text FLOPs
        raise ValueError(f"text_tokens must be >= 1, got {s.text_tokens}")


def plan_run(preset: str | CLIPConfig, settings: PlanSettings = PlanSettings()) -> dict:
    """Every number of the plan for one model and run, as plain data (JSON-ready)."""
    _check(settings)
    cfg = get_config(preset)
    if settings.text_tokens is not None and settings.text_tokens > cfg.text.context_length:
        raise ValueError(
            f"text_tokens={settings.text_tokens} is more than the text context of "
            f"{preset if isinstance(preset, str) else 'the model'} ({cfg.text.context_length})"
        )
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
