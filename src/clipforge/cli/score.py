"""`clipforge score --model M --pairs pairs.csv`: CLIPScore (Hessel et al. 2021) of image-caption pairs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data.pairs import manifest_rows
from ..use.classify import clip_score
from ..use.encoders import PRECISIONS, RUNTIMES, open_encoder


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="CLIPScore of image-caption pairs",
        description="CLIPScore = w * max(cos, 0), w = 2.5 (Hessel et al. 2021), and 100 * max(cos, 0) as "
        "torchmetrics reports it, per pair and averaged.",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--pairs", default=None, help="CSV/TSV/JSONL with image and caption columns")
    p.add_argument("--images", nargs="*", default=None, help="image files (with --prompts, one each)")
    p.add_argument("--prompts", nargs="*", default=None, help="one caption per image")
    p.add_argument("--image-key", default="image")
    p.add_argument("--caption-key", default="caption")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--runtime", choices=RUNTIMES, default="torch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="torch runtime (see embed --help)")
    p.add_argument("--json", action="store_true", help="print every pair as JSON")
    p.set_defaults(func=run)


def read_pairs(path: str, image_key: str, caption_key: str) -> tuple[list[str], list[str]]:
    base = Path(path).parent
    images, captions = [], []
    for n, row in manifest_rows(path):
        if not row.get(image_key) or not isinstance(row.get(caption_key), str):
            raise ValueError(f"{path}:{n}: needs {image_key!r} and {caption_key!r} values")
        p = Path(row[image_key])
        images.append(str(p if p.is_absolute() else base / p))
        captions.append(row[caption_key])
    return images, captions


def run(args: argparse.Namespace) -> int:
    if args.pairs:
        images, captions = read_pairs(args.pairs, args.image_key, args.caption_key)
    elif args.images and args.prompts:
        images, captions = args.images, args.prompts
    else:
        raise ValueError("give --pairs FILE, or --images ... with --prompts ... (one per image)")
    enc = open_encoder(args.model, args.runtime, device=args.device, precision=args.precision)
    result = clip_score(enc, images, captions, args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"CLIPScore over {result['count']} pairs: {result['clip_score']:.4f} "
            f"(w = {result['w']}); 100 * max(cos, 0): {result['clip_score_100']:.2f}"
        )
    for s in result["skipped"]:
        print(f"skipped {s['reason']}: {s['detail']}", file=sys.stderr)
    return 0
