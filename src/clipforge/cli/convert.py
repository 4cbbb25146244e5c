"""`clipforge convert SRC DST --format clipforge|openai|hf`: rewrite a checkpoint in another format."""

from __future__ import annotations

import argparse

from ..checkpoints.save import FORMATS, convert_checkpoint
from ..config import get_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint (OpenAI, OpenCLIP, HF, clipforge) to clipforge, openai or hf format",
        description="Read SRC (OpenAI TorchScript archive or state dict, OpenCLIP checkpoint, HF CLIP "
        "directory, clipforge directory) and write DST: a clipforge directory, an OpenAI-layout state dict "
        "(.pt) or a HF CLIP directory. Lossless.",
    )
    p.add_argument("src", help="checkpoint file or directory to read")
    p.add_argument("dst", help="where to write (a directory for clipforge/hf, a file for openai)")
    p.add_argument(
        "--format", choices=FORMATS, default="clipforge", help="output format (default: clipforge)"
    )
    p.add_argument(
        "--model",
        default=None,
        help="preset whose architecture to use instead of inferring it from the shapes",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = get_config(args.model) if args.model else None
    out = convert_checkpoint(args.src, args.dst, args.format, config=config)
    print(f"wrote {args.format} checkpoint: {out}")
    return 0
