"""LiT training speed: steps/s of Lu reading cached image embeddings vs Lu running the locked image tower
live vs Uu training the image tower, with the LiT paper's figures beside them.

One process, one run, the same towers, batch and optimizer (AdamW) for the three modes; the step is the
trainer's (`make_lit_step_fn`). Image tower: a ViT-B/32-sized tower (the `ViT-B-32` preset's vision
config; `--towers` adds others, e.g. ViT-L-14 next to the paper's L/16); text tower: the built-in demo's
(`clipforge demo`: 2 layers x 128 wide, 32 tokens, 640-id vocabulary). LiT (Zhai et al. 2022, Table 7)
measured 2.7x (B/32) and 11x (L/16) from precomputed embeddings; the gain grows with the image tower's
share of the step, so a small text tower shows it most.

    python benchmarks/lit_speed.py                                # ViT-B/32, batch 32, wall clock
    python benchmarks/lit_speed.py --threads 1 --cpu-time         # per core, robust to other jobs
    python benchmarks/lit_speed.py --towers ViT-B-32 ViT-L-14     # add a larger tower
    python benchmarks/lit_speed.py --quick                        # tiny sizes: checks that it runs

Prints a table and writes benchmarks/results/lit_speed.json (or --out).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from clipforge.config import PRESETS, CLIPConfig, get_config
from clipforge.demo import DemoConfig, demo_model_config
from clipforge.lit import apply_policy
from clipforge.models import create_model
from clipforge.train.lit_step import make_lit_step_fn
from clipforge.train.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_timing_args, at_least, format_table, time_call, write_json

# LiT Table 7: training speed-up from precomputed image embeddings (locked image tower), by image tower.
PAPER = {"B/32": 2.7, "L/16": 11.0, "g/14": 140.0}
# Our presets next to the paper's towers (ViT-L-14 is the nearest preset to L/16).
PAPER_TOWER = {"ViT-B-32": "B/32", "ViT-L-14": "L/16"}
TOKENS = 20  # caption length in tokens (SOT ... EOT), the rest of the 32 positions padding


def config_for(tower: str) -> CLIPConfig:
    """A preset's image tower with the demo's text tower."""
    demo = DemoConfig()
    text = demo_model_config(demo.vocab_size, demo).text
    base = get_config(tower)
    return base.replace(text=text)


def _batch(cfg: CLIPConfig, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    v = cfg.text.vocab_size
    tokens = torch.randint(1, v - 1, (n, cfg.text.context_length), generator=g)
    tokens[:, TOKENS:] = 0
    tokens[:, TOKENS - 1] = v - 1  # EOT, the largest id: the text tower pools there
    s = cfg.vision.image_size
    return {"image": torch.randn(n, 3, s, s, generator=g), "text": tokens}


def _step_seconds(model, batch, timing: dict) -> float:
    opt = build_optimizer(model, 1e-4, 0.1)
    step_fn = make_lit_step_fn("clip")
    model.train()

    def one() -> None:
        opt.zero_grad(set_to_none=True)
        step_fn(model, batch)
        opt.step()

    return time_call(one, **timing)["median_s"]


def measure(tower: str, batch_size: int, timing: dict) -> dict:
    cfg = config_for(tower)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = create_model(cfg)
    batch = _batch(cfg, batch_size, g)
    uu = apply_policy(create_model(cfg), "Uu")  # the image tower trained (pretrained or not: same cost)
    uu.load_state_dict(base.state_dict())
    lu = apply_policy(create_model(cfg), "Lu")
    lu.load_state_dict(base.state_dict())
    lu.visual.eval()
    t = time.perf_counter()
    with torch.no_grad():  # what `clipforge cache-embeddings` stores, once per image
        cached = {"image_embedding": lu.visual(batch["image"]), "text": batch["text"]}
    cache_s = time.perf_counter() - t
    row = {
        "image_tower": tower,
        "image_params_M": sum(p.numel() for p in base.visual.parameters()) / 1e6,
        "text_params_M": sum(p.numel() for p in base.text.parameters()) / 1e6,
        "batch": batch_size,
        "Uu_steps_per_s": 1 / _step_seconds(uu, batch, timing),
        "Lu_live_steps_per_s": 1 / _step_seconds(lu, batch, timing),
        "Lu_cached_steps_per_s": 1 / _step_seconds(lu, cached, timing),
        "cache_seconds_per_batch": cache_s,  # one untimed-warmup forward: indicative only
    }
    row["cached_vs_live"] = row["Lu_cached_steps_per_s"] / row["Lu_live_steps_per_s"]
    row["cached_vs_Uu"] = row["Lu_cached_steps_per_s"] / row["Uu_steps_per_s"]
    row["paper_tower"] = PAPER_TOWER.get(tower)
    row["paper_cached_vs_live"] = PAPER.get(row["paper_tower"] or "")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--towers", nargs="+", default=["ViT-B-32"], help="presets whose image tower is used")
    ap.add_argument("--batch-size", type=at_least(1), default=32)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tiny-vit's tower, batch 4, 1 repeat)")
    ap.add_argument("--out", default="lit_speed.json", help="JSON file (default: benchmarks/results/)")
    add_timing_args(ap, min_repeats=3, min_seconds=5.0)
    args = ap.parse_args()
    if args.quick:
        args.towers, args.batch_size = ["tiny-vit"], 4
        args.warmup, args.min_repeats, args.min_seconds = 1, 1, 0.0
        args.out = "lit_speed_quick.json" if args.out == "lit_speed.json" else args.out
    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time measures one thread: add --threads 1")
    if unknown := [t for t in args.towers if t not in PRESETS]:
        ap.error(f"unknown tower preset(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    timing = {"warmup": args.warmup, "min_repeats": args.min_repeats, "min_seconds": args.min_seconds,
              "clock": clock}  # fmt: skip
    rows = [measure(t, args.batch_size, timing) for t in args.towers]
    cols = ["image_tower", "image_params_M", "text_params_M", "batch", "Uu_steps_per_s",
            "Lu_live_steps_per_s", "Lu_cached_steps_per_s", "cached_vs_live", "cached_vs_Uu", "paper_tower",
            "paper_cached_vs_live"]  # fmt: skip
    print(format_table(rows, cols))
    print("LiT (Zhai et al. 2022) Table 7, precomputed image embeddings vs running the locked tower: "
          + ", ".join(f"{k} {v:g}x" for k, v in PAPER.items()))  # fmt: skip
    path = write_json(args.out, {
        "benchmark": "lit_speed",
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "clock": "thread_time" if args.cpu_time else "wall",
        "text_tower": "clipforge demo (DemoConfig defaults)",
        "paper_table7_cached_vs_live": PAPER,
        "rows": rows,
    })  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
