"""Per-rank memory and time of the global contrastive loss, and the all-gather volume per step.

    python benchmarks/loss_memory.py                       # 2 gloo ranks, global batch 1k..64k, D = 512
    python benchmarks/loss_memory.py --world 4 --max-measured 16384

Features only (random unit vectors, no towers): each rank holds n = M / world rows and runs the global loss
of clipforge.train.global_loss (all_gather with gradients, n x M logits) forward + backward. Memory is the
rise of the process's peak RSS over its RSS before the call (glibc serves these large blocks by mmap, so
the high-water mark is the loss's peak); sizes run in increasing order in one process group per loss, so
every size sets a new high-water mark. Sizes above --max-measured are not run: their memory is the
per-logit model fitted on the largest measured size (bytes per logit x n x M), marked "model". The
gathered volume is exact: every rank receives (M - n) x D fp32 numbers per gathered tensor (image and
text for the softmax loss, text only for the sigmoid loss), and the backward's reduce-scatter moves as
much again. Times are wall-clock on a shared CPU and vary from run to run.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import at_least, collect_ranks, format_table, write_json

SIZES = [1024, 2048, 4096, 8192, 16384, 32768, 65536]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _worker(
    rank: int, world: int, port: int, name: str, sizes: list[int], dim: int, repeats: int, out
) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from clipforge.train.dist import barrier, cleanup, init_distributed
    from clipforge.train.global_loss import DistributedLoss

    init_distributed(device="cpu")
    loss_fn = DistributedLoss(name)
    g = torch.Generator().manual_seed(rank)
    rows = []
    for m in sizes:
        n = m // world
        img = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_()
        txt = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_()
        scale = torch.tensor(14.3, requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)
        times = []
        for r in range(repeats):
            barrier()
            before = _rss_bytes()
            t0 = time.perf_counter()
            loss_fn(img, txt, scale, bias).backward()
            times.append(time.perf_counter() - t0)
            if r == 0:
                mem = _peak_rss_bytes() - before
            img.grad = txt.grad = scale.grad = bias.grad = None
        rows.append({"global_batch": m, "local_batch": n, "seconds": min(times), "loss_bytes": mem})
        del img, txt
    out.put((rank, rows))
    cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, sizes: list[int], world: int, dim: int, repeats: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, name, sizes, dim, repeats, out))
        for port in [_free_port()]
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results = collect_ranks(procs, out)
    rows = []
    for i, m in enumerate(sizes):  # per-rank figures: the worst rank
        per_rank = [results[r][i] for r in range(world)]
        rows.append(
            {
                "global_batch": m,
                "local_batch": per_rank[0]["local_batch"],
                "seconds": max(x["seconds"] for x in per_rank),
                "loss_bytes": max(x["loss_bytes"] for x in per_rank),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=at_least(1), default=2, help="gloo processes (ranks)")
    ap.add_argument("--dim", type=at_least(1), default=512, help="embedding width D (ViT-B: 512)")
    ap.add_argument(
        "--max-measured", type=at_least(SIZES[0]), default=8192, help="largest global batch actually run"
    )
    ap.add_argument("--repeats", type=at_least(1), default=2)
    ap.add_argument("--out", default="loss_memory.json")
    args = ap.parse_args()
    if SIZES[0] % args.world:
        ap.error(f"--world {args.world} does not divide the global batches {SIZES[0]}..{SIZES[-1]}")
    from clipforge.train.global_loss import gather_bytes_per_step

    table, data = [], {"args": {k: v for k, v in vars(args).items() if k != "out"}, "world": args.world}
    data |= {"dim": args.dim, "rows": []}
    for name in ("clip", "siglip"):
        measured_sizes = [m for m in SIZES if m <= args.max_measured]
        try:
            rows = measure(name, measured_sizes, args.world, args.dim, args.repeats)
        except RuntimeError as e:
            raise SystemExit(f"loss_memory.py: {name} loss: {e}") from None
        largest = rows[-1]
        bytes_per_logit = largest["loss_bytes"] / (largest["local_batch"] * largest["global_batch"])
        for m in SIZES:
            n = m // args.world
            vol = gather_bytes_per_step(m, args.dim, args.world, name)
            got = next((r for r in rows if r["global_batch"] == m), None)
            row = {
                "loss": name,
                "global_batch": m,
                "local_batch": n,
                "logits_per_rank": vol["logits_per_rank"],  # clip: two n x M matrices (both directions)
                "loss_MiB": (got["loss_bytes"] if got else bytes_per_logit * n * m) / 2**20,
                "memory": "measured" if got else "model",
                "ms": got["seconds"] * 1e3 if got else None,
                "gather_MiB_in": vol["received_bytes"] / 2**20,
                "gather_MiB_back": vol["backward_bytes"] / 2**20,
                "full_matrix_MiB": 4 * m * m / 2**20,
            }
            table.append(row)
        data[f"{name}_bytes_per_logit"] = bytes_per_logit
    data["rows"] = table
    cols = ["loss", "global_batch", "local_batch", "logits_per_rank", "loss_MiB", "memory", "ms"]
    cols += ["gather_MiB_in", "gather_MiB_back", "full_matrix_MiB"]
    print(format_table(table, cols))
    print(
        f"\nper-rank loss memory per (local x global) logit: clip {data['clip_bytes_per_logit']:.1f} B, "
        f"siglip {data['siglip_bytes_per_logit']:.1f} B (D={args.dim}, {args.world} gloo ranks on the CPU; "
        "times on a shared CPU are noisy)"
    )
    path = write_json(args.out, data)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
