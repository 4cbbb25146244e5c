"""`clipforge export-onnx MODEL OUT_DIR`: visual.onnx + textual.onnx + clipforge_onnx.json + tokenizer."""

from __future__ import annotations

import argparse

from ..use.onnx_export import OPSET, export_onnx


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export the image and text towers as two ONNX graphs",
        description="Projected features exactly as encode_image / encode_text (dynamic batch and text "
        "length); run them with `clipforge embed|classify --runtime onnx --model OUT_DIR`.",
    )
    p.add_argument("model", help="checkpoint (any format clipforge.load reads) or preset name")
    p.add_argument("out", help="output directory")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the outputs inside the graphs")
    p.add_argument("--opset", type=int, default=OPSET)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = export_onnx(args.model, args.out, normalize=args.normalize, opset=args.opset)
    print(
        f"wrote {args.out}/visual.onnx, textual.onnx, clipforge_onnx.json "
        f"({spec['embed_dim']}-d, opset {spec['opset']})"
    )
    return 0
