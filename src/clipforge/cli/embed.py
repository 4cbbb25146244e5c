"""`clipforge embed --model M --data SRC --out DIR`: embed a collection (see clipforge.use.embedder)."""

from __future__ import annotations

import argparse

from ..models.hardware import usable_cores
from ..use.embedder import DTYPES, MODALITIES, EmbedOptions, embed
from ..use.encoders import PRECISIONS, RUNTIMES
from ..use.inputs import KINDS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed an image folder, manifest, WebDataset shards or captions file",
        description="Write L2-normalised embeddings in parts (DIR/img_emb, DIR/text_emb: .npy), parquet "
        "metadata and DIR/manifest.json (model fingerprint, counts, skips by reason). Rerun into the "
        "same DIR to resume after a crash; --append embeds only new inputs into a finished DIR.",
    )
    p.add_argument("--model", required=True, help="checkpoint (any format clipforge.load reads) or ONNX dir")
    p.add_argument(
        "--data", required=True, help="image folder, manifest (.csv/.tsv/.jsonl), shards, captions .txt"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--modality", choices=(*MODALITIES, "auto"), default="auto")
    p.add_argument("--kind", choices=KINDS, default=None, help="data kind (default: detected)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--workers",
        type=int,
        default=usable_cores(),
        help="DataLoader processes decoding images (default: the usable cores, at most 4)",
    )
    p.add_argument("--part-size", type=int, default=10_000, help="inputs per part file")
    p.add_argument("--dtype", choices=DTYPES, default="float16")
    p.add_argument("--append", action="store_true", help="add new inputs to a finished directory")
    p.add_argument("--image-key", default="image", help="manifest column of image paths")
    p.add_argument("--caption-key", default="caption", help="manifest column of captions")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="bf16 / fp16: autocast; bf16-weights: a bf16 copy of the weights (fastest on bf16-capable CPUs)",
    )
    p.add_argument(
        "--fast-decode",
        action="store_true",
        help="decode JPEGs at reduced scale (PIL draft) down to the model's input size: faster on large "
        "photos, slightly different pixels (recorded in the manifest as fast_decode)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    opts = EmbedOptions(
        modality=args.modality,
        kind=args.kind,
        batch_size=args.batch_size,
        workers=args.workers,
        part_size=args.part_size,
        dtype=args.dtype,
        append=args.append,
        image_key=args.image_key,
        caption_key=args.caption_key,
        progress=not args.no_progress,
        fast_decode=args.fast_decode,
    )
    m = embed(
        args.data,
        args.out,
        args.model,
        runtime=args.runtime,
        device=args.device,
        precision=args.precision,
        options=opts,
    )
    run = m["runs"][-1]
    if run["inputs_done_before"]:
        print(
            f"{args.out}: {run['inputs_done_before']} inputs were done by earlier runs; "
            f"this run added {run['rows_added']} rows"
        )
    skipped = ", ".join(f"{k} {v}" for k, v in m["skipped"].items()) or "none"
    where = f" (names in {args.out}/skipped.log)" if m["skipped"] else ""
    print(
        f"{args.out}: {m['count']} rows in {len(m['parts'])} parts ({m['modality']}, {m['dim']}-d "
        f"{m['dtype']}{', fast JPEG decoding' if m.get('fast_decode') else ''}); skipped: {skipped}{where}"
    )
    return 0
