"""`clipforge classify --model M IMAGES... --labels "a cat,a dog"`: zero-shot classification."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from ..data.pairs import IMAGE_EXTS
from ..models.hardware import usable_cores
from ..use.classify import Classifier
from ..use.encoders import PRECISIONS, RUNTIMES, open_encoder


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify",
        help="zero-shot classify images with your own labels",
        description="Labels are embedded once (templates averaged), images in batches; softmax for CLIP "
        "models, sigmoid for models with a logit bias (SigLIP-style).",
    )
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--model", required=True, help="checkpoint or ONNX directory (with --runtime onnx)")
    p.add_argument("--labels", default=None, help="comma-separated labels")
    p.add_argument("--labels-file", default=None, help="one label per line")
    p.add_argument("--template", action="append", default=None, help='e.g. "a photo of a {}." (repeatable)')
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--workers",
        type=int,
        default=usable_cores(),
        help="DataLoader processes decoding images (default: the usable cores, at most 4)",
    )
    p.add_argument("--format", choices=("json", "csv"), default="json")
    p.add_argument("--output", default=None, help="write here instead of stdout")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="torch runtime (see embed --help)")
    p.set_defaults(func=run)


def image_paths(args_images: list[str]) -> list[str]:
    out = []
    for a in args_images:
        p = Path(a)
        if p.is_dir():
            out += [str(f) for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_EXTS and f.is_file()]
        else:
            out.append(a)
    return out


def read_labels(args: argparse.Namespace) -> list[str]:
    if args.labels_file:
        path = Path(args.labels_file)
        labels = [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        if not labels:
            raise ValueError(f"labels file empty: {path}")
        return labels
    labels = [x.strip() for x in (args.labels or "").split(",") if x.strip()]
    if not labels:
        raise ValueError("no labels: pass --labels 'a cat,a dog' or --labels-file FILE")
    return labels


def run(args: argparse.Namespace) -> int:
    enc = open_encoder(args.model, args.runtime, device=args.device, precision=args.precision)
    clf = Classifier(enc, read_labels(args), args.template or ["{}"])
    results, skipped = clf.classify(image_paths(args.images), args.top_k, args.batch_size, args.workers)
    if args.output:
        with open(args.output, "w", encoding="utf-8", newline="") as f:
            write_results(f, args.format, results, skipped)
    else:
        write_results(sys.stdout, args.format, results, skipped)
    for s in skipped:
        print(f"skipped {s['reason']}: {s['detail']}", file=sys.stderr)
    return 0


def write_results(f, fmt: str, results: list[dict], skipped: list[dict]) -> None:
    if fmt == "json":
        json.dump({"results": results, "skipped": skipped}, f, indent=2)
        f.write("\n")
        return
    w = csv.writer(f)
    w.writerow(["path", "rank", "label", "score"])
    for r in results:
        for rank, (label, score) in enumerate(zip(r["labels"], r["scores"]), 1):
            w.writerow([r["path"], rank, label, score])
