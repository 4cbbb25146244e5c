"""Training throughput: samples/s, MFU and peak memory of a full training step, against a baseline.

    python benchmarks/train_throughput.py                       # all cores, wall clock
    python benchmarks/train_throughput.py --threads 1 --cpu-time  # stable numbers on a shared machine
    python benchmarks/train_throughput.py --only small-vit baseline-small-vit

A step is the trainer's own `Trainer.train_step` (data already in memory, batch 64): forward + backward
of `clipforge.loss.clip_loss`, grad clipping at 1.0, AdamW (`build_optimizer`), temperature clamp;
"bf16" is the trainer's bf16 autocast with fp32 weights.

BASELINE, measured in the same run: OpenAI's reference model code (site-packages/clip/model.py of the
`openai-clip` package: nn.MultiheadAttention with an explicit causal mask, all context positions,
LayerNorm with fp32 casts) built with small-vit's architecture, trained by the same Trainer with the
same loss, optimizer, clipping, batch and data. `ours/baseline` is the samples/s ratio per precision.

Data: random images and captions of 5..--caption-tokens tokens (SOT and EOT included; default 20 of
small-vit's 32 positions). clipforge trims the text batch to the longest caption; the baseline runs all
32 positions. The row "small-vit full-ctx" uses 32-token captions, so nothing is trimmed there.

FLOPs per step (forward + backward) come from torch's FlopCounterMode (2 x multiply-accumulates; the CPU
flash-attention kernels, forward and backward, added with torch's SDPA formulas, full non-causal
attention). Two MFUs: `mfu_own` uses each row's own FLOP count (what that model actually computes: ours
trims text, masking drops patches); `mfu_base_flops` uses the baseline's untrimmed, unmasked FLOP count
for the same architecture: the useful work of a full CLIP step, the same numerator for ours and the
baseline (apples to apples; above 1 is possible for masked rows). Peak = best measured matmul of
2048^3 on the same threads and clock: fp32 peak for fp32 rows, bf16 peak for bf16 rows.

Each row runs in its own process, so ru_maxrss is that row's peak RSS. `--cpu-time` times by the thread's
CPU time (with `--threads 1`), which other processes on a shared machine hardly change. Issue reference:
a well-known implementation trains small-vit at ~52 samples/s fp32 (~55% MFU) on this 2-core machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_timing_args, count_flops, format_table, matmul_peak, time_call, write_json
from clipforge.models.hardware import slow_bf16_reason

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (label, preset, implementation, precision, mask ratio, full-context captions[, compiled])
ROWS = [
    ("tiny-vit", "tiny-vit", "clipforge", "fp32", 0.0, False),
    ("demo-vit", "demo-vit", "clipforge", "fp32", 0.0, False),
    ("small-vit", "small-vit", "clipforge", "fp32", 0.0, False),
    ("small-vit", "small-vit", "clipforge", "bf16", 0.0, False),
    ("small-vit full-ctx", "small-vit", "clipforge", "fp32", 0.0, True),
    ("small-vit FLIP 0.5", "small-vit", "clipforge", "fp32", 0.5, False),
    ("baseline-small-vit", "small-vit", "openai", "fp32", 0.0, False),
    ("baseline-small-vit", "small-vit", "openai", "bf16", 0.0, False),
    # train.compile=true: the towers through torch.compile (--compile-backend), timed after warm-up
    ("small-vit compiled", "small-vit", "clipforge", "fp32", 0.0, False, True),
    ("small-vit compiled", "small-vit", "clipforge", "bf16", 0.0, False, True),
]
GPU_ROWS = [
    ("ViT-B-32", "ViT-B-32", "clipforge", "bf16", 0.0, False),
    ("ViT-B-32 FLIP 0.5", "ViT-B-32", "clipforge", "bf16", 0.5, False),
]


def load_openai_model_module():
    """OpenAI's clip/model.py by file path (`import clip` pulls in torchvision, which we never import)."""
    path = importlib.metadata.distribution("openai-clip").locate_file("clip/model.py")
    spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_baseline(cfg):
    """OpenAI's CLIP with the architecture of a clipforge ViT config (heads = width // 64 in the tower)."""
    v, t = cfg.vision, cfg.text
    if v.kind != "vit" or v.width // 64 != v.heads or v.act != "quick_gelu" or t.act != "quick_gelu":
        raise ValueError("the OpenAI baseline needs a QuickGELU ViT config with 64-wide vision heads")
    model = load_openai_model_module().CLIP(
        embed_dim=cfg.embed_dim,
        image_resolution=v.image_size,
        vision_layers=v.layers,
        vision_width=v.width,
        vision_patch_size=v.patch_size,
        context_length=t.context_length,
        vocab_size=t.vocab_size,
        transformer_width=t.width,
        transformer_heads=t.heads,
        transformer_layers=t.layers,
    )
    max_log_scale = math.log(cfg.max_logit_scale)

    def clamp(m) -> None:
        with torch.no_grad():
            m.logit_scale.clamp_(0, max_log_scale)

    return model, clamp


def baseline_step_fn(lam: float = 0.5):
    """The Trainer's step_fn for OpenAI's model: same loss as clipforge's step (fp32, autocast off)."""
    from clipforge.loss import clip_loss

    def step_fn(model, batch, step: int = 0, backward=None) -> torch.Tensor:
        img = model.encode_image(batch["image"])
        txt = model.encode_text(batch["text"])
        with torch.autocast("cpu", enabled=False):
            img = img.float() / img.float().norm(dim=-1, keepdim=True)
            txt = txt.float() / txt.float().norm(dim=-1, keepdim=True)
            loss = clip_loss(img, txt, model.logit_scale.exp().float(), lam=lam)
        backward(loss) if backward is not None else loss.backward()
        return loss.detach()

    return step_fn


def make_batch(cfg, batch: int, max_tokens: int, full: bool, device: str) -> dict[str, torch.Tensor]:
    """Random images and (batch, context) captions: SOT, random ids, EOT (the largest id), zero padding."""
    g = torch.Generator().manual_seed(0)
    S, ctx, V = cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size
    images = torch.randn(batch, 3, S, S, generator=g)
    top = ctx if full else min(max_tokens, ctx)
    lengths = torch.full((batch,), ctx) if full else torch.randint(5, top + 1, (batch,), generator=g)
    lengths[0] = top  # the longest caption is exactly `top` tokens
    tokens = torch.zeros(batch, ctx, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0] = V - 2
        tokens[i, 1 : n - 1] = torch.randint(1, V - 2, (n - 2,), generator=g)
        tokens[i, n - 1] = V - 1
    return {"image": images.to(device), "text": tokens.to(device)}


def one_row(spec: dict[str, Any], args) -> dict[str, Any]:
    from clipforge import create_model, get_config
    from clipforge.train.optim import build_optimizer
    from clipforge.train.step import make_step_fn
    from clipforge.train.trainer import Trainer

    torch.manual_seed(0)
    device = spec["device"]
    cfg = get_config(spec["preset"])
    if spec["impl"] == "openai":
        model, after_step = build_baseline(cfg)
        step_fn = baseline_step_fn()
    else:
        model = create_model(cfg)
        after_step = type(model).clamp_logit_scale
        step_fn = make_step_fn("clip", mask_ratio=spec["mask"])
    model = model.to(device)
    compiled = bool(spec.get("compile"))
    trainer = Trainer(
        model,
        step_fn,
        build_optimizer(model, 1e-4, 0.2),
        None,
        data=None,
        steps=1,
        batch_size=args.batch,
        precision=spec["precision"],
        grad_clip=1.0,
        after_step=after_step,
        progress=False,
        handle_signals=False,
    )
    batch = make_batch(cfg, args.batch, args.caption_tokens, spec["full_ctx"], device)
    text_positions = int(batch["text"].argmax(-1).max()) + 1 if spec["impl"] == "clipforge" else None

    flops = count_flops(lambda: trainer.train_step(batch))  # eager: the compiled step does the same maths
    if compiled:
        from clipforge.models.compile import compile_towers

        reason = compile_towers(model, backend=args.compile_backend)
        if reason is not None:
            raise RuntimeError(f"cannot compile here: {reason}")
        t0 = time.perf_counter()
        trainer.train_step(batch)  # compilation happens in the first steps, not in the timed ones
        trainer.train_step(batch)
        compile_s = time.perf_counter() - t0
    clock = time.thread_time if args.cpu_time else time.perf_counter

    def step() -> None:
        trainer.train_step(batch)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time_call(
        step, warmup=args.warmup, min_repeats=args.min_repeats, min_seconds=args.min_seconds, clock=clock
    )
    row = {
        "row": spec["label"],
        "preset": spec["preset"] if isinstance(spec["preset"], str) else "a config (see row)",  # gpu_check's
        "impl": spec["impl"],
        "precision": spec["precision"],
        "mask": spec["mask"],
        "device": device,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "text_pos": text_positions or cfg.text.context_length,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": t["median_s"],
        "step_s_best": t["best_s"],
        "samples_per_s": args.batch / t["median_s"],
        "samples_per_s_best": args.batch / t["best_s"],
        "gflop_step": flops / 1e9,
        "repeats": t["repeats"],
        "compiled": args.compile_backend if compiled else "",
    }
    if compiled:
        row["compile_s"] = compile_s
    if device == "cuda":
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return row


def run_row(spec: dict[str, Any], args) -> dict[str, Any] | None:
    cmd = [sys.executable, __file__, "--row", json.dumps(spec), "--threads", str(spec["threads"])]
    cmd += ["--batch", str(args.batch), "--caption-tokens", str(args.caption_tokens)]
    cmd += ["--warmup", str(args.warmup), "--min-repeats", str(args.min_repeats)]
    cmd += ["--min-seconds", str(args.min_seconds)] + (["--cpu-time"] if args.cpu_time else [])
    cmd += ["--compile-backend", args.compile_backend]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        tqdm.write(f"{spec['label']} {spec['precision']} failed:\n{out.stderr[-3000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", help="run only rows whose label starts with one of these")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--caption-tokens", type=int, default=20, help="longest caption, SOT and EOT included")
    add_timing_args(p, min_repeats=5, min_seconds=5.0)
    p.add_argument("--out", default="train_throughput.json", help="relative names go to benchmarks/results/")
    p.add_argument(
        "--compile-backend", default="inductor",
        help="torch.compile backend of the compiled rows (aot_eager: no code generation, a quick check)",
    )  # fmt: skip
    p.add_argument(
        "--quick", action="store_true",
        help="a check that every row runs: demo-vit for small-vit, batch 8, one timed step (no figures)",
    )  # fmt: skip
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row's spec as JSON
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.warmup, args.min_repeats, args.min_seconds = 8, 1, 1, 0.0
    if args.cpu_time and args.threads != 1:
        p.error("--cpu-time measures one thread's CPU time; use it with --threads 1")
    torch.set_num_threads(args.threads)
    if args.row:
        print(json.dumps(one_row(json.loads(args.row), args)))
        return 0

    clock = time.thread_time if args.cpu_time else time.perf_counter
    clock_name = "thread CPU time (time.thread_time)" if args.cpu_time else "wall clock (time.perf_counter)"
    specs = [(*r, "cpu") for r in ROWS] + (
        [(*r, "cuda") for r in GPU_ROWS] if torch.cuda.is_available() else []
    )
    specs = [
        {"label": s[0], "preset": s[1], "impl": s[2], "precision": s[3], "mask": s[4], "full_ctx": s[5],
         "compile": len(s) > 7 and s[6], "device": s[-1], "threads": args.threads}
        for s in specs
        if not args.only or any(s[0].startswith(o) for o in args.only)
    ]  # fmt: skip
    if args.quick:  # small-vit's shape at demo size (64-wide heads, as the OpenAI baseline needs)
        specs = [{**s, "preset": "demo-vit" if s["preset"] == "small-vit" else s["preset"]} for s in specs]
    if not specs:
        labels = ", ".join(dict.fromkeys(r[0] for r in ROWS))
        p.error(f"--only {' '.join(args.only)} matches no row; rows: {labels}")
    peak_seconds, peak_n = (0.2, 512) if args.quick else (2.0, 2048)  # --quick: no figures, just a check
    # Only the peaks some row's MFU divides by: on a CPU without bf16 matrix instructions one 2048^3 bf16
    # GEMM takes 10-60 s, and fp32-only runs (--only ... or a GPU-less subset) need none of them.
    needed = {s["precision"] for s in specs if s["device"] == "cpu"}
    peaks = {k: matmul_peak(DTYPES[k], peak_n, peak_seconds, clock) for k in sorted(needed)}
    rows, failed = [], []
    for s in tqdm(specs, desc="train_throughput", unit="row"):
        if r := run_row(s, args):
            rows.append(r)
        else:
            failed.append(f"{s['label']} {s['precision']}")
    # The machine may have been busier at the start: keep the best peak seen.
    peaks = {k: max(v, matmul_peak(DTYPES[k], peak_n, peak_seconds, clock)) for k, v in peaks.items()}

    base_flops = {r["precision"]: r["gflop_step"] for r in rows if r["impl"] == "openai"}
    base_speed = {r["precision"]: r["samples_per_s_best"] for r in rows if r["impl"] == "openai"}
    for r in rows:
        if r["device"] != "cpu":
            continue
        peak = peaks[r["precision"]]
        r["mfu_own"] = r["gflop_step"] * 1e9 / r["step_s_best"] / peak
        if r["row"].startswith(("small-vit", "baseline-small-vit")) and r["precision"] in base_flops:
            r["gflop_base"] = base_flops[r["precision"]]
            r["mfu_base_flops"] = r["gflop_base"] * 1e9 / r["step_s_best"] / peak
            r["ours/baseline"] = r["samples_per_s_best"] / base_speed[r["precision"]]

    print(
        f"clock: {clock_name}; {args.threads} torch threads; batch {args.batch}; captions up to "
        f"{args.caption_tokens} tokens (full-ctx row: all positions)\n"
        f"matmul peak (best {peak_n}^3 GEMM, same threads/clock): "
        + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
        + f"; load average {os.getloadavg()[0]:.2f}"
    )
    if "bf16" in peaks and (slow := slow_bf16_reason()):
        print(f"bf16 rows: {slow}; their MFU divides by this CPU's (emulated) bf16 GEMM rate")
    columns = [
        "row",
        "precision",
        "compiled",
        "mask",
        "text_pos",
        "params_m",
        "samples_per_s",
        "samples_per_s_best",
        "ours/baseline",
        "gflop_step",
        "gflop_base",
        "mfu_own",
        "mfu_base_flops",
        "peak_rss_mb",
    ]
    if any(r["device"] == "cuda" for r in rows):
        columns.append("peak_mem_mb")
    print(format_table(rows, columns))
    print(
        "samples/s: median and best step; ours/baseline, MFU: best step. gflop_step = the row's own FLOPs "
        "per step (fwd+bwd); gflop_base = the baseline's untrimmed, unmasked FLOPs for the same "
        "architecture; mfu_own = own FLOPs / time / peak; mfu_base_flops = baseline FLOPs / time / peak "
        "(same numerator for ours and the baseline)."
    )
    path = write_json(
        args.out,
        {"args": {k: v for k, v in vars(args).items() if k not in ("out", "row")}, "clock": clock_name,
         "peak_flops": peaks, "results": rows, "failed": failed},
    )  # fmt: skip
    print(f"wrote {path}")
    if failed:
        print(f"{len(failed)} row(s) failed (their errors are above): {'; '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
