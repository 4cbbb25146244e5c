"""`clipforge shards SRC OUT`: write WebDataset shards from a manifest or a folder with sidecar captions."""

from __future__ import annotations

import argparse

from ..data.pairs import read_folder, read_manifest
from ..data.shard_writer import write_shards
from ..data.skips import SkipCounter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="write WebDataset tar shards from a manifest or an image folder")
    p.add_argument("src", help="manifest (.csv/.tsv/.jsonl) or folder of images with sidecar .txt captions")
    p.add_argument("out", help="output folder for NNNNNN.tar shards and sizes.json")
    p.add_argument("--max-size", default="100MB", help="largest shard size (e.g. 100MB, 1GiB; default 100MB)")
    p.add_argument("--max-count", type=int, default=10_000, help="most samples per shard (default 10000)")
    p.add_argument("--image-key", default="image", help="manifest image-path column (default: image)")
    p.add_argument("--caption-key", default="caption", help="manifest caption column (default: caption)")
    p.add_argument("--sep", default="||", help="separator of several captions in one field (default: ||)")
    p.add_argument(
        "--root", default=None, help="folder that relative image paths start from (default: the manifest's)"
    )
    p.add_argument(
        "--no-verify", action="store_true", help="copy jpg/png/webp bytes without decoding them first"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the shards already in OUT (written aside, then swapped in)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    skips = SkipCounter(args.src)
    if Path(args.src).is_dir():
        records = read_folder(args.src, skips=skips)
    else:
        records = read_manifest(
            args.src, args.image_key, args.caption_key, sep=args.sep or None, root=args.root, skips=skips
        )
    if not records:
        raise ValueError(f"no usable image-caption pairs in {args.src} ({skips.summary()})")
    report = write_shards(
        records,
        args.out,
        max_size=args.max_size,
        max_count=args.max_count,
        verify=not args.no_verify,
        skips=skips,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    print(report.summary())
    return 0
