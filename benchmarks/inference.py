"""Inference throughput of encode_image / encode_text per preset, fp32 and bf16, with MFU.

    python benchmarks/inference.py                      # tiny-vit demo-vit small-vit ViT-B-32 RN50
    python benchmarks/inference.py ViT-B-32 --large     # also ViT-B-16 and ViT-L-14
    python benchmarks/inference.py --dtypes fp32 bf16 bf16-autocast --batch 32 --min-seconds 3

For each preset and precision it measures images/s (encode_image) and texts/s (encode_text) for
realistic captions (--caption-tokens, 20 by default, SOT and EOT included) and for full-context texts,
under torch.inference_mode after a warm-up, with one fixed batch and all cores. It also measures the
EOT truncation: the same captions run through all context positions ("text-nocut").

FLOPs per item come from torch's FlopCounterMode (2 x multiply-accumulates; CPU flash attention added,
counted as full non-causal attention, as the usual GMAC figures do). MFU = achieved FLOP/s / the
measured matmul peak (best of repeated 2048^3 GEMMs): fp32 peak for every row, and the bf16 peak too
for bf16 rows. Throughput is reported as the median and the best call; MFU uses the best call against
the best peak, the least disturbed pair on a shared machine. Results go to benchmarks/results/inference.json.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_timing_args, at_least, count_flops, format_table, matmul_peak, time_call, write_json
from clipforge import create_model
from clipforge.config import PRESETS
from clipforge.models.hardware import slow_bf16_reason

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
DEFAULT_PRESETS = ["tiny-vit", "demo-vit", "small-vit", "ViT-B-32", "RN50"]
LARGE_PRESETS = ["ViT-B-16", "ViT-L-14"]
# Forward GMACs per item at 224 px / 77 tokens (../shared/reference/FACTS.md), to check the counter.
KNOWN_GMACS = {("ViT-B-32", "image"): 4.41, ("ViT-B-16", "image"): 17.6, ("ViT-L-14", "image"): 81.1}
KNOWN_TEXT_GMACS = {(512, 12, 77): 2.98}  # (width, layers, tokens) of a full-context text


def caption_tokens(model, n: int, length: int, seed: int = 0) -> torch.LongTensor:
    """(n, context) rows of `length` tokens: SOT, random ids, EOT (the largest id), zero padding."""
    cfg = model.config.text
    if not 2 <= length <= cfg.context_length:
        raise ValueError(f"caption length {length} outside [2, {cfg.context_length}]")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, cfg.context_length, dtype=torch.long)
    tokens[:, 0] = cfg.vocab_size - 2
    tokens[:, 1 : length - 1] = torch.randint(1, cfg.vocab_size - 2, (n, length - 2), generator=g)
    tokens[:, length - 1] = cfg.vocab_size - 1
    return tokens


def encode_text_full_context(model, tokens: torch.Tensor) -> torch.Tensor:
    """encode_text without the cut at the longest EOT: every context position runs through the Transformer."""
    text = model.text
    x = text.token_embedding(tokens) + text.pos_embed[: tokens.shape[1]].to(text.token_embedding.weight.dtype)
    x = text.transformer(x, causal=True)
    x = text.ln_final(x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)])
    return x @ text.proj.to(x.dtype)


def bench_preset(name: str, dtype: str, args, peaks: dict[str, float], clock) -> list[dict[str, Any]]:
    model = create_model(name).eval()
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16-autocast" else contextlib.nullcontext()
    )
    cfg = model.config
    B, S, ctx = args.batch, cfg.vision.image_size, cfg.text.context_length
    pixels = torch.randn(B, 3, S, S)
    L = min(args.caption_tokens, ctx)
    tasks = {  # task: (function, input, tokens per text)
        "image": (model.encode_image, pixels, None),
        "text-caption": (model.encode_text, caption_tokens(model, B, L), L),
        "text-full": (model.encode_text, caption_tokens(model, B, ctx, seed=1), ctx),
        "text-nocut": (lambda t: encode_text_full_context(model, t), caption_tokens(model, B, L), L),
    }
    rows = []
    with torch.inference_mode(), autocast:
        captions = tasks["text-caption"][1]
        cut, nocut = model.encode_text(captions).float(), encode_text_full_context(model, captions).float()
        max_diff = (cut - nocut).abs().max().item() / cut.abs().max().item()
        for task, (fn, x, tokens) in tasks.items():
            flops = count_flops(lambda fn=fn, x=x: fn(x[:1]))
            t = time_call(
                lambda fn=fn, x=x: fn(x),
                warmup=args.warmup,
                min_repeats=args.min_repeats,
                min_seconds=args.min_seconds,
                clock=clock,
            )
            achieved = flops * B / t["best_s"]
            row = {
                "model": name,
                "dtype": dtype,
                "task": task,
                "tokens": tokens,
                "batch": B,
                "items_per_s": B / t["median_s"],
                "items_per_s_best": B / t["best_s"],
                "gflop_per_item": flops / 1e9,
                "gflop_per_s": achieved / 1e9,
                "mfu_fp32": achieved / peaks["fp32"],
                "mfu_bf16": achieved / peaks["bf16"] if dtype != "fp32" else None,
                "repeats": t["repeats"],
            }
            if task == "text-nocut":
                row["cut_vs_nocut_rel_diff"] = max_diff
            known = KNOWN_GMACS.get((name, task))
            if task == "text-full":
                known = KNOWN_TEXT_GMACS.get((cfg.text.width, cfg.text.layers, ctx))
            if known is not None:
                row["gmacs_reference"] = known
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("presets", nargs="*", default=None, help=f"default: {' '.join(DEFAULT_PRESETS)}")
    p.add_argument("--large", action="store_true", help=f"also run {' '.join(LARGE_PRESETS)}")
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["fp32", "bf16"],
        choices=["fp32", "bf16", "bf16-autocast"],
        help="bf16 = bf16 weights; bf16-autocast = fp32 weights under torch.autocast",
    )
    p.add_argument("--batch", type=at_least(1), default=32)
    p.add_argument("--caption-tokens", type=at_least(2), default=20, help="caption length incl. SOT and EOT")
    add_timing_args(p, min_repeats=3, min_seconds=2.0)
    p.add_argument(
        "--out", default="inference.json", help="JSON file (relative names go to benchmarks/results/)"
    )
    args = p.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        p.error("--cpu-time measures one thread's CPU time; use it with --threads 1")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    presets = (args.presets or DEFAULT_PRESETS) + (LARGE_PRESETS if args.large else [])
    if unknown := [n for n in presets if n not in PRESETS]:
        p.error(f"unknown preset(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}")
    if any(d != "fp32" for d in args.dtypes) and (slow := slow_bf16_reason()):
        print(f"warning: {slow}", file=sys.stderr)

    # The fp32 peak is every row's MFU denominator; the bf16 peak only bf16 rows'. Not measuring it
    # otherwise matters on a CPU without bf16 matrix instructions, where one 2048^3 bf16 GEMM takes ~1 min.
    needed = ["fp32"] + (["bf16"] if any(d != "fp32" for d in args.dtypes) else [])
    peaks = {k: matmul_peak(getattr(torch, DTYPES[k]), clock=clock) for k in needed}
    rows: list[dict[str, Any]] = []
    for name, dtype in tqdm([(n, d) for n in presets for d in args.dtypes], desc="inference", unit="run"):
        rows += bench_preset(name, dtype, args, peaks, clock)
    # The machine may have been busier at the start: keep the best peak seen.
    peaks = {k: max(v, matmul_peak(getattr(torch, DTYPES[k]), clock=clock)) for k, v in peaks.items()}
    for row in rows:
        row["mfu_fp32"] = row["gflop_per_s"] * 1e9 / peaks["fp32"]
        if row["dtype"] != "fp32":
            row["mfu_bf16"] = row["gflop_per_s"] * 1e9 / peaks["bf16"]

    speedups = {}
    for r in rows:
        if r["task"] == "text-nocut":
            cut = next(
                c
                for c in rows
                if (c["model"], c["dtype"], c["task"]) == (r["model"], r["dtype"], "text-caption")
            )
            speedups[f"{r['model']} {r['dtype']}"] = cut["items_per_s_best"] / r["items_per_s_best"]
            r["truncation_speedup"] = speedups[f"{r['model']} {r['dtype']}"]

    measured = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
    print(f"matmul peak (best of 2048^3 GEMMs): {measured}; {args.threads} threads, batch {args.batch}")
    columns = [
        "model",
        "dtype",
        "task",
        "tokens",
        "items_per_s",
        "items_per_s_best",
        "gflop_per_item",
        "gflop_per_s",
        "mfu_fp32",
        "mfu_bf16",
        "truncation_speedup",
    ]
    print(format_table(rows, columns))
    for r in rows:
        if "gmacs_reference" in r and r["dtype"] == args.dtypes[0]:
            print(
                f"FLOP check {r['model']} {r['task']}: counted {r['gflop_per_item'] / 2:.3f} GMACs, "
                f"reference {r['gmacs_reference']} GMACs"
            )
    path = write_json(
        args.out,
        {
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "peak_flops": peaks,
            "results": rows,
            "truncation_speedup": speedups,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
