"""Start a server: open the model (and index), check the bind address, run uvicorn.

service = build_service("ckpt/", index="emb/")
serve(service, host="127.0.0.1", port=8000)
with running(create_app(service)) as url: ...       # tests and benchmarks: a free loopback port
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..use.encoders import open_encoder
from ..use.store import read_manifest
from .app import create_app
from .config import ServeConfig, check_bind
from .service import Service


def build_service(
    model: str | Path | None,
    index: str | Path | None = None,
    *,
    runtime: str = "torch",
    device: str = "cpu",
    precision: str = "fp32",
    modality: str = "image",
    config: ServeConfig | None = None,
) -> Service:
    """A Service over `model` (default: the model the index's manifest names) and the index, if any."""
    if model is None:
        if index is None:
            raise ValueError("give --model, or --index DIR whose manifest names the model")
        model = read_manifest(index)["model"]["source"].removeprefix("preset:")
    if runtime == "torch" and Path(model, "clipforge_onnx.json").is_file():
        runtime = "onnx"  # an export-onnx directory can only be served by ONNX Runtime
    encoder = open_encoder(model, runtime, device=device, precision=precision)
    return Service(encoder, config or ServeConfig(), index_dir=index, modality=modality)


def serve(service: Service, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    check_bind(host, service.cfg.api_key)
    uvicorn.run(
        create_app(service),
        host=host,
        port=port,
        log_level=log_level,
        timeout_keep_alive=5,
        # uvicorn answers 503 beyond this many open connections, before any work is queued
        limit_concurrency=max(64, service.cfg.max_queue),
    )


@contextlib.contextmanager
def running(app: Any, host: str = "127.0.0.1", log_level: str = "warning") -> Iterator[str]:
    """Run `app` on uvicorn in a thread on a free port of `host`; yields the base URL, stops on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_keep_alive=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
