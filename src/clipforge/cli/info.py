"""`clipforge info [MODEL]`: list presets, or build one and print its structure and size."""

from __future__ import annotations

import argparse

import torch

from ..config import PRESETS
from ..models import create_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="list model presets, or build one and print it")
    p.add_argument("model", nargs="?", help="preset name (default: list all presets)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.model is None:
        print(f"{'preset':<14} {'tower':<7} {'image':>5} {'embed':>5} {'params':>12}")
        for name, cfg in PRESETS.items():
            with torch.device("meta"):  # count parameters without allocating them
                n = sum(p.numel() for p in create_model(cfg).parameters())
            size = f"{n:,}"
            print(f"{name:<14} {cfg.vision.kind:<7} {cfg.vision.image_size:>5} {cfg.embed_dim:>5} {size:>12}")
        return 0
    model = create_model(args.model)
    print(model)
    vis = sum(p.numel() for p in model.visual.parameters())
    txt = sum(p.numel() for p in model.text.parameters())
    print(f"\n{args.model}: image tower {vis:,} params, text tower {txt:,} params, total {vis + txt + 1:,}")
    print(f"config: {model.config.to_dict()}")
    return 0
