"""Data-parallel scaling: training samples/s with 1 and 2 gloo processes on the CPU (and 1 GPU if present).

    python benchmarks/scaling.py                        # tiny-vit, 32 pairs per rank, 1 thread per rank
    python benchmarks/scaling.py --preset demo-vit --batch 64 --steps 10

Weak scaling: every rank keeps the same local batch, so W ranks train on a W x larger global batch.
A step is what the trainer runs: DDP-wrapped model, contrastive_step with the global loss
(clipforge.train.global_loss.DistributedLoss: all-gathered features with gradients), AdamW step.
Efficiency = samples/s(W) / (W x samples/s(1)). Each configuration runs in fresh processes with the same
number of threads per rank, so 2 ranks use 2 cores where 1 rank uses 1; the "1 x 2 threads" row shows
what one process makes of both cores. On a CPU shared with other jobs the numbers are noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import at_least, collect_ranks, format_table, write_json
from clipforge.config import PRESETS


def _batch(n: int, image_size: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    texts = torch.zeros(n, 77, dtype=torch.long)
    texts[:, 0] = vocab - 2
    texts[:, 1:16] = torch.randint(1, vocab - 2, (n, 15), generator=g)
    texts[:, 16] = vocab - 1  # EOT: 17 tokens after trimming
    return images, texts


def _worker(
    rank: int, world: int, port: int, args: argparse.Namespace, threads: int, device: str, out
) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from clipforge.config import get_config
    from clipforge.models import create_model
    from clipforge.train.dist import barrier, cleanup, init_distributed
    from clipforge.train.fsdp import wrap_ddp
    from clipforge.train.global_loss import DistributedLoss
    from clipforge.train.step import contrastive_step

    info = init_distributed(device=device)
    cfg = get_config(args.preset)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=args.vocab))
    torch.manual_seed(0)
    model = wrap_ddp(create_model(cfg).to(info.device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-6)
    images, texts = _batch(args.batch, cfg.vision.image_size, args.vocab, seed=rank)
    images, texts = images.to(info.device), texts.to(info.device)
    loss_fn = DistributedLoss("clip")

    def step():
        opt.zero_grad(set_to_none=True)
        contrastive_step(model, images, texts, loss_fn)
        opt.step()

    for _ in range(args.warmup):
        step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    barrier()
    out.put((rank, time.perf_counter() - t0))
    cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, threads: int, args: argparse.Namespace, device: str = "cpu") -> float:
    """samples/s of `world` processes (all local batches together)."""
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, args, threads, device, out)) for r in range(world)
    ]
    for p in procs:
        p.start()
    seconds = max(collect_ranks(procs, out).values())
    return world * args.batch * args.steps / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny-vit", choices=list(PRESETS), metavar="PRESET")
    ap.add_argument(
        "--vocab", type=at_least(4), default=49408, help="text vocabulary (smaller = cheaper embedding)"
    )
    ap.add_argument("--batch", type=at_least(1), default=32, help="pairs per rank")
    ap.add_argument("--steps", type=at_least(1), default=10)
    ap.add_argument("--warmup", type=at_least(0), default=2)
    ap.add_argument("--out", default="scaling.json")
    args = ap.parse_args()

    try:
        rows = measure(args)
    except RuntimeError as e:
        raise SystemExit(f"scaling.py: {e}") from None
    print(
        format_table(
            rows, ["device", "processes", "threads_each", "global_batch", "samples_per_s", "efficiency"]
        )
    )
    print(f"\n{args.preset}, {args.batch} pairs per rank, {args.steps} steps; shared CPU: numbers are noisy")
    path = write_json(
        args.out,
        {
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "preset": args.preset,
            "batch_per_rank": args.batch,
            "vocab": args.vocab,
            "rows": rows,
        },
    )
    print(f"wrote {path}")


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    base = run(1, 1, args)
    rows.append(
        {
            "device": "cpu",
            "processes": 1,
            "threads_each": 1,
            "global_batch": args.batch,
            "samples_per_s": base,
        }
    )
    sps = run(2, 1, args)
    rows.append(
        {
            "device": "cpu",
            "processes": 2,
            "threads_each": 1,
            "global_batch": 2 * args.batch,
            "samples_per_s": sps,
        }
    )
    rows[-1]["efficiency"] = sps / (2 * base)
    one_two = run(1, 2, args)
    rows.append(
        {
            "device": "cpu",
            "processes": 1,
            "threads_each": 2,
            "global_batch": args.batch,
            "samples_per_s": one_two,
        }
    )
    rows[-1]["efficiency"] = one_two / (2 * base)
    if torch.cuda.is_available():
        gpu = run(1, 1, args, device="cuda")
        name = torch.cuda.get_device_name(0)
        rows.append(
            {
                "device": name,
                "processes": 1,
                "threads_each": 1,
                "global_batch": args.batch,
                "samples_per_s": gpu,
            }
        )
    rows[0]["efficiency"] = 1.0
    return rows


if __name__ == "__main__":
    main()
