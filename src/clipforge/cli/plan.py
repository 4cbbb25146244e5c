"""`clipforge plan [--preset P] [--batch B] [--samples N] [--gpus G --gpu v100|a100|h100|h200]`.

What a training run costs: parameters, FLOPs, memory per GPU, all-gather traffic, days (clipforge.train.plan).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="parameters, FLOPs, memory per GPU, all-gather traffic and days of a training run"
    )
    p.add_argument("--preset", help="one model (default: a table of the nine paper presets)")
    p.add_argument("--batch", type=int, default=32768, help="global contrastive batch")
    p.add_argument("--samples", type=float, default=12.8e9, help="pairs seen in the run (paper: 12.8e9)")
    p.add_argument("--gpus", type=int, default=256)
    p.add_argument("--gpu", default="v100", help="v100, a100, h100 or h200")
    p.add_argument("--utilisation", type=float, default=0.3, help="assumed model FLOPs utilisation")
    p.add_argument("--mask-ratio", type=float, default=0.0, help="FLIP masking (ViTs): FLOPs, days")
    p.add_argument("--text-tokens", type=int, default=None, help="positions per caption (default: context)")
    p.add_argument("--loss", default="clip", help="objective (clip, siglip): B x B buffers and gathers")
    p.add_argument("--micro-batch", type=int, default=None, help="per-GPU forward batch (default: B / gpus)")
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and AdamW state")
    p.add_argument("--output", default="plan_out", help="folder for plan.json and plan.md")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.plan import PlanSettings, paper_runs, plan_markdown, plan_run, preset_table

    settings = PlanSettings(
        batch=args.batch,
        samples=args.samples,
        gpus=args.gpus,
        gpu=args.gpu,
        utilisation=args.utilisation,
        mask_ratio=args.mask_ratio,
        text_tokens=args.text_tokens,
        loss=args.loss,
        micro_batch=args.micro_batch,
        fsdp=args.fsdp,
    )
    plans = [plan_run(args.preset, settings)] if args.preset else preset_table(settings)
    paper = paper_runs(args.utilisation)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps({"plans": plans, "paper_runs": paper}, indent=1) + "\n")
    md = plan_markdown(plans, paper)
    (out / "plan.md").write_text(md)
    print(md)
    print(f"written: {out / 'plan.json'}, {out / 'plan.md'}")
    return 0
