"""`clipforge serve [--index DIR] --model M`: the HTTP API and search page (see clipforge.serve)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..use.encoders import PRECISIONS, RUNTIMES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve embed / classify / search over HTTP, with a search page at /",
        description="FastAPI on uvicorn: /v1/embed/text, /v1/embed/image, /v1/classify, /v1/search, "
        "/v1/thumbnail/ID, /v1/index/add, /v1/health, /metrics, /openapi.json, and a search page at /. "
        "Binding beyond loopback needs an API key (CLIPFORGE_API_KEY or --api-key-file).",
    )
    p.add_argument(
        "--model", default=None, help="checkpoint, preset or ONNX dir (default: the index's model)"
    )
    p.add_argument("--index", default=None, help="an indexed embedding directory (embed + index)")
    p.add_argument("--modality", choices=("image", "text"), default="image", help="which index to search")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--runtime", choices=RUNTIMES, default="torch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--api-key-file", default=None, help="a file holding the API key (else CLIPFORGE_API_KEY)")
    p.add_argument("--no-batching", action="store_true", help="one forward per request")
    p.add_argument("--max-batch", type=int, default=32, help="items per forward")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="how long a batch waits for company")
    p.add_argument("--max-upload-mb", type=float, default=8.0, help="request body limit")
    p.add_argument("--max-k", type=int, default=100)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a request is answered 503")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        if not key:
            raise ValueError(f"{args.api_key_file} is empty: put the API key in it")
        return key
    return os.environ.get("CLIPFORGE_API_KEY") or None


def run(args: argparse.Namespace) -> int:
    from ..serve.config import ServeConfig, check_bind

    key = _api_key(args)
    check_bind(args.host, key)  # before loading anything: a refused bind fails in a second
    try:
        from ..serve.server import build_service, serve
    except ImportError as e:
        raise ValueError(f"clipforge serve needs its extra: pip install 'clipforge[serve]' ({e})") from None
    config = ServeConfig(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_k=args.max_k,
        timeout_s=args.timeout,
        batching=not args.no_batching,
        max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms,
        api_key=key,
    )
    service = build_service(
        args.model,
        args.index,
        runtime=args.runtime,
        device=args.device,
        precision=args.precision,
        modality=args.modality,
        config=config,
    )
    print(f"clipforge serve: http://{args.host}:{args.port}/ (API description at /openapi.json)", flush=True)
    serve(service, host=args.host, port=args.port, log_level=args.log_level)
    return 0
