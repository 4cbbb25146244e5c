"""torch.compile for the towers, in place: module types and state-dict keys stay as they are.

    reason = compile_towers(model)   # None when compiled; else why not (training continues eager)

Each tower's forward is compiled (`nn.Module.compile`), not the CLIP wrapper: the step functions call
`encode_image` / `encode_text` and the towers directly, and checkpoints, locking and FSDP see the same
modules as without compilation. Where torch.compile cannot work here (no C++ compiler for the CPU
backend, an unsupported Python or platform) nothing is compiled and the reason is returned, so the
caller can say it once and go on eagerly.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn


def compile_unavailable(backend: str = "inductor") -> str | None:
    """Why torch.compile cannot run here, or None."""
    try:
        import torch._dynamo as dynamo
    except ImportError as e:  # pragma: no cover - torch builds without dynamo
        return f"torch.compile is not available in this torch build ({e})"
    if not dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version or platform"
    if backend == "inductor" and not torch.cuda.is_available() and shutil.which("c++") is None:
        return "the CPU backend needs a C++ compiler (c++ not found on PATH)"
    return None


def compile_towers(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> str | None:
    """Compile `model.visual` and `model.text` in place; returns None, or the reason nothing was done."""
    reason = compile_unavailable(backend)
    if reason is not None:
        return reason
    # The image batch has one shape; text batches are cut at their longest caption, so their length
    # varies: dynamic=None lets dynamo mark it dynamic after the first recompile instead of compiling
    # once per length (up to its recompile limit). (Finding the cut, int(eot.max()), is a graph break.)
    for name, dynamic in (("visual", False), ("text", None)):
        tower = getattr(model, name, None)
        if tower is not None:
            tower.compile(backend=backend, mode=mode, dynamic=dynamic)
    return None
