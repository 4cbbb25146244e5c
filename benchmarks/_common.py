"""Helpers shared by the benchmark scripts: timing, matmul peak, FLOP counting, tables, JSON.

Every benchmark prints a table and writes a JSON file under `benchmarks/results/`. Numbers depend on
the machine and on whatever else runs on it; the JSON records the environment next to the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from clipforge.models.flops import count_flops  # noqa: F401  (re-exported for the benchmarks)
from clipforge.models.hardware import slow_bf16_reason

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def at_least(lowest: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse `type` that reads `kind` and refuses values below `lowest` with a one-line error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a{'n integer' if kind is int else ' number'}: {text!r}"
            ) from None
        if not value >= lowest:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {text}")
        return value

    return parse


def add_timing_args(p: argparse.ArgumentParser, min_repeats: int, min_seconds: float) -> None:
    """The timing options every benchmark shares (threads, clock, warm-up, repeats)."""
    p.add_argument("--threads", type=at_least(1), default=os.cpu_count())
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the thread's CPU time (needs --threads 1): robust to other processes on the machine",
    )
    p.add_argument("--warmup", type=at_least(0), default=2)
    p.add_argument("--min-repeats", type=at_least(1), default=min_repeats)
    p.add_argument("--min-seconds", type=at_least(0.0, float), default=min_seconds)


def time_call(
    fn: Callable[[], Any],
    warmup: int = 2,
    min_repeats: int = 5,
    min_seconds: float = 2.0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Seconds per call of `fn()`: median and best over at least `min_repeats` calls and `min_seconds`.

    `clock=time.thread_time` measures the calling thread's CPU time instead of wall time: with one
    torch thread it is the work done, hardly changed by other processes competing for the cores."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return {"median_s": statistics.median(times), "best_s": min(times), "repeats": len(times)}


def matmul_peak(
    dtype: torch.dtype = torch.float32,
    n: int = 2048,
    min_seconds: float = 2.0,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Measured matmul throughput in FLOP/s: the best of repeated (n x n) @ (n x n) products."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    with torch.inference_mode():
        t = time_call(
            lambda: torch.mm(a, b, out=out), warmup=2, min_repeats=3, min_seconds=min_seconds, clock=clock
        )
    return 2 * n**3 / t["best_s"]


def collect_ranks(procs: Sequence[Any], out: Any) -> dict[int, Any]:
    """{rank: result} from `(rank, result)` pairs the started `procs` put on the multiprocessing Queue
    `out`, then joins them. A rank that dies never reports: raise instead of waiting forever."""
    results: dict[int, Any] = {}
    while len(results) < len(procs):
        try:
            rank, result = out.get(timeout=1.0)
            results[rank] = result
        except queue.Empty:
            if dead := [p.exitcode for p in procs if p.exitcode]:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a rank process exited with {dead[0]} (its traceback is above)") from None
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"rank process exited with {p.exitcode}")
    return results


def bf16_matrix_flags() -> list[str]:
    """The CPU's bf16 matrix instructions named in /proc/cpuinfo (AMX, AVX512-BF16); [] where it has none."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def environment() -> dict[str, Any]:
    """Where the numbers come from: the CPU and the instructions torch uses on it (bf16 is only fast where
    the CPU has bf16 matrix instructions), torch, cores and threads, the load at the end of the run."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_matrix_instructions": bf16_matrix_flags(),
        "bf16_slow_reason": slow_bf16_reason(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Plain-text table; floats get 3 significant digits (or integer digits when larger)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]  # rows may be []
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def write_json(name: str | Path, data: dict[str, Any]) -> Path:
    """Write `data` (plus the environment) to benchmarks/results/<name> (or to a given path)."""
    path = Path(name)
    if not path.is_absolute() and path.parent == Path("."):
        path = RESULTS_DIR / path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **data}, indent=2) + "\n")
    return path
