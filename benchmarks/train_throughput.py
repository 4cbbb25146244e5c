"""Training throughput: samples/s, MFU and peak memory of a full training step (data already in memory).

    python benchmarks/train_throughput.py                 # CPU rows (+ ViT-B-32 on a GPU when present)
    python benchmarks/train_throughput.py --only small-vit --steps 10

A step is the trainer's own `Trainer.train_step`: forward + backward of the contrastive loss, grad
clipping, AdamW, temperature clamp. FLOPs are counted with torch.utils.flop_counter on one step (matmuls
and attention, forward and backward); MFU = achieved FLOP/s / the measured peak of a large fp32 (resp.
bf16) matmul on the same threads. Each row runs in its own process so ru_maxrss is that row's peak.
Issue reference: a well-known implementation trains small-vit (the 22M CLIP) at ~52 samples/s fp32
(~55% MFU) on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "train_throughput.json"
CPU_ROWS = [
    ("tiny-vit", "fp32", 0.0),
    ("tiny-rn", "fp32", 0.0),
    ("demo-vit", "fp32", 0.0),
    ("small-vit", "fp32", 0.0),
    ("small-vit", "bf16", 0.0),
    ("small-vit", "fp32", 0.5),
    ("tiny-vit", "bf16", 0.0),
]


def matmul_peak(dtype: torch.dtype, device: str, n: int = 1024, reps: int = 10) -> float:
    """FLOP/s of an n x n matmul (the practical peak the MFU is measured against)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def one_row(name: str, precision: str, mask_ratio: float, batch: int, steps: int, device: str) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from clipforge import create_model, get_config
    from clipforge.train.optim import build_optimizer
    from clipforge.train.step import make_step_fn
    from clipforge.train.trainer import Trainer

    torch.manual_seed(0)
    cfg = get_config(name)
    model = create_model(cfg).to(device)
    S, T = cfg.vision.image_size, min(32, cfg.text.context_length)
    images = torch.randn(batch, 3, S, S, device=device)
    tokens = torch.randint(1, cfg.text.vocab_size - 1, (batch, T), device=device)
    tokens[:, -1] = cfg.text.vocab_size - 1  # EOT last: all T positions are used (no trimming)
    step_fn = make_step_fn("clip", mask_ratio=mask_ratio)
    opt = build_optimizer(model, 1e-4, 0.1)
    trainer = Trainer(
        model,
        step_fn,
        opt,
        None,
        data=None,
        steps=steps,
        batch_size=batch,
        precision=precision,
        grad_clip=1.0,
        after_step=lambda m: m.clamp_logit_scale(),
        progress=False,
        handle_signals=False,
    )
    trainer.device = torch.device(device)
    batch_d = {"image": images, "text": tokens}
    with FlopCounterMode(display=False) as fc:
        trainer.train_step(batch_d)
    flops = fc.get_total_flops()
    trainer.train_step(batch_d)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch_d)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32, device)
    row = {
        "model": name,
        "device": device,
        "threads": torch.get_num_threads(),
        "precision": precision,
        "mask_ratio": mask_ratio,
        "batch_size": batch,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": dt,
        "samples_per_s": batch / dt,
        "gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / dt / 1e9,
        "peak_matmul_gflops": peak / 1e9,
        "mfu": flops / dt / peak,
    }
    if device == "cuda":
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="run only rows of this preset")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: name,precision,mask,device
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.row:
        name, precision, mask, device = args.row.split(",")
        print(json.dumps(one_row(name, precision, float(mask), args.batch, args.steps, device)))
        return
    rows = [(n, p, m, "cpu") for n, p, m in CPU_ROWS if not args.only or n == args.only]
    if torch.cuda.is_available():
        rows += [
            ("ViT-B-32", "bf16", 0.0, "cuda"),
            ("ViT-B-32", "fp16", 0.0, "cuda"),
            ("ViT-B-32", "bf16", 0.5, "cuda"),
        ]
    results = []
    print(
        f"{'model':10} {'dev':4} {'prec':5} {'mask':>4} {'samples/s':>10} {'GFLOP/step':>11}"
        f" {'MFU':>6} {'peak MB':>8}"
    )
    for name, precision, mask, device in rows:
        batch = 256 if device == "cuda" else args.batch
        cmd = [
            sys.executable,
            __file__,
            "--row",
            f"{name},{precision},{mask},{device}",
            "--steps",
            str(args.steps),
            "--batch",
            str(batch),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if out.returncode:
            print(f"{name} {precision} failed:\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        mem = r.get("peak_mem_mb", r.get("peak_rss_mb"))
        print(
            f"{name:10} {device:4} {precision:5} {mask:4.2f} {r['samples_per_s']:10.1f} "
            f"{r['gflop_per_step']:11.1f} "
            f"{100 * r['mfu']:5.1f}% {mem:8.0f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "rows": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
