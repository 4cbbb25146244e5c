"""What this machine offers the models: bf16 matrix instructions, and how many cores a process may use.

On a CPU, oneDNN runs bf16 matrix products fast only on cores with AVX512 (and fastest with AVX512-BF16 or
AMX); on an AVX2-only CPU it converts to and from fp32 around slow kernels. Measured on a 2-core AVX2 AMD
EPYC with torch 2.13: a (1600 x 768) @ (768 x 3072) linear ran at 15 GFLOP/s in bf16 against 77 in fp32,
a plain 2048^3 matmul at 0.3 against 113: bf16 there is 5x to 400x slower, while the same code on an
AVX512-BF16 EPYC ran ~2x faster than fp32. Callers warn before running bf16 where it is slow.
"""

from __future__ import annotations

import os

import torch


def native_bf16_cpu() -> bool:
    """Whether torch's oneDNN deems this CPU bf16-capable (False where this torch cannot say)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def slow_bf16_reason(device: str | torch.device = "cpu") -> str | None:
    """Why bf16 would run slower than fp32 on `device`, or None (GPUs, and bf16-capable CPUs)."""
    if torch.device(device).type != "cpu" or native_bf16_cpu():
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"this CPU has no bf16 matrix instructions (torch sees {capability}; bf16 needs AVX512, best with "
        "AVX512-BF16 or AMX): bf16 runs several times slower than fp32 here"
    )


def usable_cores(most: int = 4) -> int:
    """The cores this process may use (its CPU affinity), at most `most`: the default for DataLoader
    workers and for the demo's threads (more processes or threads than cores only compete)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(most, cores or 1))
