"""LiT training speed: steps/s of Lu with cached image embeddings vs Lu with the locked tower run live vs uu.

Same towers, batch and text tower for the three modes, one process, one run. The LiT paper (Table 7)
saw 2.7x (B/32) to 11x (L/16) from precomputed embeddings; the gain grows with the image tower's share
of the step. Prints a table and writes JSON:

    .venv/bin/python benchmarks/lit_speed.py --out benchmarks/results/lit_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from clipforge.config import CLIPConfig, TextConfig, VisionConfig
from clipforge.lit import apply_policy
from clipforge.models import create_model
from clipforge.train.lit_step import make_lit_step_fn
from clipforge.train.optim import build_optimizer

TEXT = TextConfig(context_length=32, vocab_size=2048, width=192, heads=3, layers=4)
TOWERS = {
    # ~1.8M-parameter image tower (the demo's)
    "small ViT 4x192 @64px/p8": VisionConfig(
        kind="vit", image_size=64, width=192, layers=4, heads=3, patch_size=8
    ),
    # ~21M-parameter image tower: width 384, 12 layers at 96 px / patch 8 (144 tokens)
    "larger ViT 12x384 @96px/p8": VisionConfig(
        kind="vit", image_size=96, width=384, layers=12, heads=6, patch_size=8
    ),
}


def _batch(cfg: CLIPConfig, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    tokens = torch.randint(1, cfg.text.vocab_size - 1, (n, 24), generator=g)
    tokens[:, 20:] = 0
    tokens[:, 19] = cfg.text.vocab_size - 1  # EOT, the largest id
    s = cfg.vision.image_size
    return {"image": torch.randn(n, 3, s, s, generator=g), "text": tokens}


def _steps_per_s(model, step_fn, batch, warmup: int, steps: int) -> float:
    opt = build_optimizer(model, 1e-4, 0.1)
    model.train()

    def one():
        opt.zero_grad(set_to_none=True)
        step_fn(model, batch)
        opt.step()

    for _ in range(warmup):
        one()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    return steps / (time.perf_counter() - t)


def run(batch_size: int, warmup: int, steps: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    step_fn = make_lit_step_fn("clip")
    for name, vision in TOWERS.items():
        cfg = CLIPConfig(embed_dim=128, vision=vision, text=TEXT)
        torch.manual_seed(0)
        base = create_model(cfg)
        batch = _batch(cfg, batch_size, g)
        uu = base
        lu = apply_policy(create_model(cfg), "Lu")
        lu.load_state_dict(base.state_dict())
        with torch.no_grad():
            lu.visual.eval()
            cached = {"image_embedding": lu.visual(batch["image"]), "text": batch["text"]}
        r = {
            "image_tower": name,
            "image_params_M": sum(p.numel() for p in base.visual.parameters()) / 1e6,
            "text_params_M": sum(p.numel() for p in base.text.parameters()) / 1e6,
            "batch": batch_size,
            "uu_steps_per_s": _steps_per_s(uu, step_fn, batch, warmup, steps),
            "Lu_live_steps_per_s": _steps_per_s(lu, step_fn, batch, warmup, steps),
            "Lu_cached_steps_per_s": _steps_per_s(lu, step_fn, cached, warmup, steps),
        }
        r["cached_vs_live"] = r["Lu_cached_steps_per_s"] / r["Lu_live_steps_per_s"]
        r["cached_vs_uu"] = r["Lu_cached_steps_per_s"] / r["uu_steps_per_s"]
        rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/lit_speed.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.batch_size, args.warmup, args.steps)
    cols = f"{'img M':>6s} {'uu/s':>7s} {'Lu live/s':>10s} {'Lu cached/s':>12s} {'cached/live':>12s}"
    head = f"{'image tower':28s} {cols}"
    print(head)
    for r in rows:
        print(f"{r['image_tower']:28s} {r['image_params_M']:6.1f} {r['uu_steps_per_s']:7.2f} "
              f"{r['Lu_live_steps_per_s']:10.2f} {r['Lu_cached_steps_per_s']:12.2f} "
              f"{r['cached_vs_live']:11.1f}x")  # fmt: skip
    out = {
        "benchmark": "lit_speed",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.platform(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
