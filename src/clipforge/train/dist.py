"""The process group: join the one torchrun describes, rank helpers, barrier, cleanup.

Launch with `torchrun --nproc_per_node=N -m clipforge train ...`; torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and `init_distributed()` reads them (NCCL on GPUs, gloo on CPU).
Without those variables everything here degrades to a single process: world 1, rank 0.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class LaunchError(RuntimeError):
    """The environment describes a process group this process cannot join (e.g. WORLD_SIZE without
    torchrun's other variables, more ranks than GPUs): the CLI says so in one line."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(
    device: str | torch.device = "auto", backend: str | None = None, timeout_s: float = 1800.0
) -> DistInfo:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    device "auto" picks cuda:LOCAL_RANK when GPUs exist, else the CPU; backend defaults to nccl for
    CUDA and gloo for the CPU. Without WORLD_SIZE > 1 nothing is initialised (a single process). Calling
    it again in an initialised process returns the current state.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise LaunchError(
                f"LOCAL_RANK {local_rank} needs GPU {device.index} but this node has "
                f"{torch.cuda.device_count()}: use --nproc_per_node <= the GPU count"
            )
        torch.cuda.set_device(device)
    if world <= 1:
        return DistInfo(0, 1, 0, device, None)
    if not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} outside WORLD_SIZE={world}")
    if not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise LaunchError(
                f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun (it sets them)"
            )
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if device.type == "cuda":
            kwargs["device_id"] = device  # binds NCCL to this GPU (no hangs on the wrong device)
        dist.init_process_group(**kwargs)
    return DistInfo(rank, world, local_rank, device, dist.get_backend())


# what gloo / NCCL / the c10d store say when another process of the job died (killed, crashed, its node lost)
_PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
)


def lost_peer(error: BaseException) -> str | None:
    """One line for an error raised in a collective because another rank went away, else None."""
    if _env_int("WORLD_SIZE", 1) <= 1 or not isinstance(error, RuntimeError):
        return None
    text = str(error)
    if not (isinstance(error, dist.DistError) or any(p in text for p in _PEER_LOST)):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return (
        f"rank {get_rank()}: another rank of the job stopped or cannot be reached ({first[:160]}); "
        "the launcher's summary names the rank that failed first; continue from the newest checkpoint "
        "with --resume"
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """The process group's rank, else torchrun's RANK (before init, after cleanup), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes logs, plots and checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup(timeout_s: float = 60.0) -> None:
    """Leave the process group. Gloo's teardown can hang once in a while even after a barrier (2 CPU ranks
    under load: about one run in 70 here; pytorch/pytorch#75097): after `timeout_s` the rank says so and
    goes on, leaving the teardown thread behind (every result is written by then), and `leave_process`
    ends the process without waiting for it."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    done = threading.Thread(target=dist.destroy_process_group, name="destroy_process_group", daemon=True)
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        print(f"clipforge: leaving the process group took over {timeout_s:.0f} s; going on", flush=True)


def leave_process(code: int) -> None:
    """End a torchrun worker now, with `code`, once its results are written and its output flushed:
    interpreter shutdown (a hung teardown thread above, gloo's destructors, joining worker processes) may
    otherwise keep a finished rank alive and the launcher waiting. Outside torchrun, nothing happens."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and _env_int("WORLD_SIZE", 1) <= 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any (e.g. a SIGTERM that reached one rank: all stop together)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sum_over_ranks(values: list[int]) -> list[int]:
    """Element-wise sums over the ranks (a collective: every rank calls it at the same point)."""
    if not is_distributed():
        return [int(v) for v in values]
    t = torch.tensor(values, dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def gather_json(value: Any) -> list[Any]:
    """Every rank's JSON-able `value`, in rank order (a collective; JSON bytes, never pickle)."""
    if not is_distributed():
        return [value]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    raw = torch.tensor(list(json.dumps(value).encode("utf-8")), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([raw.numel()], dtype=torch.long, device=device))
    top = max(int(n) for n in sizes)
    parts = [torch.zeros(top, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(parts, torch.cat([raw, raw.new_zeros(top - raw.numel())]))
    return [json.loads(bytes(p[: int(n)].tolist()).decode("utf-8")) for p, n in zip(parts, sizes)]
