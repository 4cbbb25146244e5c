"""The GPU check: one command, a few minutes on one GPU, no internet. Prints tables, writes JSON.

    benchmarks/gpu_check.sh                      # = python benchmarks/gpu_check.py (PYTHONPATH=src)
    python benchmarks/gpu_check.py --dry-run     # every section on the CPU with tiny presets (seconds)
    python benchmarks/gpu_check.py --only parity ddp

Sections (each a table; checks marked ok/FAIL; exit status 1 when a check fails):

- parity: ViT-B-32 and RN50 with random weights (seeded), image and text features on the GPU against the
  CPU in fp32: fp32 with TF32 off (max |diff| / max |cpu| <= 1e-4, min cosine >= 0.99999), bf16 autocast
  (min cosine >= 0.99) and fp16 autocast (min cosine >= 0.999): the tolerances of 8- and 11-bit mantissas
  through 12 residual blocks.
- train: ViT-B-32 training samples/s, MFU and peak memory (bf16 autocast, batch 256, the trainer's own
  step: loss, backward, clipping, AdamW): clipforge with FLIP masking off/0.5 and compiled off/on
  (train.compile, inductor), against OpenAI's reference model code (benchmarks/train_throughput.py
  builds it) in the same run. MFU = FLOPs per step (FlopCounterMode, eager) / step time / the measured
  bf16 matmul peak of this GPU (8192^3); `tflops` is the achieved rate, to compare with the spec sheet.
- ddp: a world-size-1 NCCL process group: DDP + the gathered (global) loss against the plain step on
  a copy of the model: the same loss and gradients (max |diff| relative <= 1e-5 on the GPU, whose
  attention backward accumulates with atomics; 1e-6 on the CPU).
- input: the training input pipeline feeding the GPU: WebDataset shards of photo-like 400-800 px
  JPEGs (benchmarks/input_pipeline.py writes them), clipforge's stream at 224 px (RandomResizedCrop) with
  N DataLoader workers, batches copied to the GPU (pinned, non-blocking) and normalised there (fast
  path; the exact path for comparison at the most workers). Compare with the train section's
  samples/s: the workers needed to keep the GPU busy.

Peak memory: per train row (torch.cuda.max_memory_allocated) and for the parity forwards.
`--dry-run` runs all of it on the CPU with tiny models and batches (aot_eager instead of inductor, gloo
instead of NCCL): it checks the script, not the GPU; tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, format_table, write_json

SECTIONS = ("parity", "train", "ddp", "input")
TOL = {  # precision -> (max |diff| / max |ref| or None, min cosine)
    "fp32": (1e-4, 0.99999),
    "bf16": (None, 0.99),
    "fp16": (None, 0.999),
}


@dataclasses.dataclass
class Plan:
    """What each section runs: the GPU sizes, or tiny CPU ones for --dry-run."""

    device: str
    parity_models: tuple[Any, ...]
    train_model: Any
    batch: int
    compile_backend: str
    workers: tuple[int, ...]
    photos: int  # distinct photos in the input section's shards (repeated to fill them)
    input_size: int
    input_batch: int
    input_batches: int
    timing: dict[str, float]


def make_plan(dry: bool) -> Plan:
    from clipforge.config import get_config

    if not dry:
        return Plan(
            "cuda", ("ViT-B-32", "RN50"), "ViT-B-32", 256, "inductor", (0, 4, 8, 14), 256, 224, 128, 24,
            {"warmup": 3, "min_repeats": 10, "min_seconds": 3.0},
        )  # fmt: skip
    tiny = get_config("tiny-vit")  # 64-wide vision heads (the shape OpenAI's code builds), a small vocabulary
    tiny = dataclasses.replace(
        tiny,
        vision=dataclasses.replace(tiny.vision, heads=1),
        text=dataclasses.replace(tiny.text, vocab_size=1000, context_length=24),
    )
    return Plan(
        "cpu", ("tiny-vit", "tiny-rn"), tiny, 4, "aot_eager", (0, 1), 8, 32, 4, 2,
        {"warmup": 1, "min_repeats": 1, "min_seconds": 0.0},
    )  # fmt: skip


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _name(model: Any) -> str:
    return model if isinstance(model, str) else "tiny-vit (1 head)"


# ------------------------------------------------------------------------------------------ parity
def _compare(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    ref, got = ref.float().cpu(), got.float().cpu()
    rel = float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-12))
    cos = float(torch.nn.functional.cosine_similarity(ref, got, dim=-1).min())
    return rel, cos


def parity(plan: Plan) -> list[dict[str, Any]]:

    # fp32 means fp32 here (cuDNN's convolutions default to TF32); restored for the later sections
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _parity(plan)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _parity(plan: Plan) -> list[dict[str, Any]]:
    from clipforge import create_model

    rows = []
    for name in plan.parity_models:
        torch.manual_seed(0)
        model = create_model(name).eval()
        size, ctx = model.config.vision.image_size, model.config.text.context_length
        g = torch.Generator().manual_seed(1)
        images = torch.randn(4, 3, size, size, generator=g)  # unit scale, as normalised pixels are
        vocab = model.config.text.vocab_size
        texts = torch.randint(1, vocab - 2, (4, ctx), generator=g)
        texts[:, 0] = vocab - 2  # SOT
        texts[torch.arange(4), torch.tensor([5, 9, 20, ctx - 1])] = vocab - 1  # EOT (the largest id)
        with torch.no_grad():
            ref = (model.encode_image(images), model.encode_text(texts))
        dev = model.to(plan.device)
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if plan.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                with torch.no_grad(), torch.autocast(plan.device, dtype=dtype, enabled=dtype is not None):
                    got = (dev.encode_image(images.to(plan.device)), dev.encode_text(texts.to(plan.device)))
            except RuntimeError as e:  # e.g. fp16 autocast kernels missing on an old CPU build (dry run)
                rows.append({"model": name, "precision": precision, "check": f"skipped: {str(e)[:60]}"})
                continue
            max_rel, min_cos = TOL[precision]
            row: dict[str, Any] = {"model": name, "precision": precision, "device": plan.device}
            for tower, r, o in (("image", ref[0], got[0]), ("text", ref[1], got[1])):
                row[f"{tower}_rel"], row[f"{tower}_cos"] = _compare(r, o)
            ok = all(row[f"{t}_cos"] >= min_cos for t in ("image", "text"))
            ok = ok and (max_rel is None or all(row[f"{t}_rel"] <= max_rel for t in ("image", "text")))
            row["tolerance"] = f"cos>={min_cos}" + (f", rel<={max_rel:g}" if max_rel else "")
            row["check"] = "ok" if ok else "FAIL"
            if plan.device == "cuda":
                row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
            rows.append(row)
        del dev, model
    return rows


# ------------------------------------------------------------------------------------------ train
def device_matmul_peak(device: str, dtype: torch.dtype, n: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = math.inf
    for i in range(8):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def train(plan: Plan) -> list[dict[str, Any]]:
    import train_throughput as tt

    args = argparse.Namespace(
        batch=plan.batch, caption_tokens=20, cpu_time=False, compile_backend=plan.compile_backend,
        **plan.timing,
    )  # fmt: skip
    peak = device_matmul_peak(plan.device, torch.bfloat16, 8192 if plan.device == "cuda" else 256)
    specs = [
        ("openai", 0.0, False),
        ("clipforge", 0.0, False),
        ("clipforge", 0.5, False),
        ("clipforge", 0.0, True),
        ("clipforge", 0.5, True),
    ]
    rows = []
    for impl, mask, compiled in specs:
        label = ("baseline " if impl == "openai" else "") + _name(plan.train_model)
        label += (f" FLIP {mask}" if mask else "") + (" compiled" if compiled else "")
        spec = {"label": label, "preset": plan.train_model, "impl": impl, "precision": "bf16", "mask": mask,
                "full_ctx": False, "compile": compiled, "device": plan.device}  # fmt: skip
        try:
            row = tt.one_row(spec, args)
        except Exception as e:  # one failing row (e.g. no compiler) must not hide the others
            rows.append({"row": label, "check": f"FAIL: {type(e).__name__}: {str(e)[:80]}"})
            continue
        row["tflops"] = row["gflop_step"] / row["step_s_best"] / 1e3
        row["mfu"] = row["gflop_step"] * 1e9 / row["step_s_best"] / peak
        rows.append(row)
    base = next((r["samples_per_s_best"] for r in rows if r.get("impl") == "openai"), None)
    for r in rows:
        if base and "samples_per_s_best" in r:
            r["x_openai"] = r["samples_per_s_best"] / base
        r["peak_tflops"] = peak / 1e12
    return rows


# ------------------------------------------------------------------------------------------ ddp
def ddp(plan: Plan) -> list[dict[str, Any]]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from clipforge import create_model
    from clipforge.train.global_loss import DistributedLoss
    from clipforge.train.step import contrastive_step

    backend = "nccl" if plan.device == "cuda" else "gloo"
    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group(backend, init_method=f"file://{f.name}", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            name = plan.parity_models[0]
            plain = create_model(name).to(plan.device)
            wrapped = DDP(copy.deepcopy(plain), device_ids=[0] if plan.device == "cuda" else None)
            size, ctx = plain.config.vision.image_size, plain.config.text.context_length
            g = torch.Generator().manual_seed(2)
            n = min(plan.batch, 32)
            images = torch.randn(n, 3, size, size, generator=g)
            texts = torch.randint(1, plain.config.text.vocab_size - 2, (n, ctx), generator=g)
            texts[:, 10] = plain.config.text.vocab_size - 1
            a = contrastive_step(plain, images, texts, "clip")
            b = contrastive_step(wrapped, images, texts, DistributedLoss("clip", "global", 0.5))
            sync(plan.device)
            diffs = [
                float((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12))
                for p, q in zip(plain.parameters(), wrapped.module.parameters())
                if p.grad is not None
            ]
            row = {"model": name, "backend": backend, "world": dist.get_world_size(), "loss": a.loss,
                   "ddp_loss": b.loss, "max_grad_rel_diff": max(diffs),
                   "params_compared": len(diffs)}  # fmt: skip
            # float rounding only: the GPU's memory-efficient attention backward accumulates with atomics
            tol = 1e-5 if plan.device == "cuda" else 1e-6
            row["check"] = "ok" if abs(a.loss - b.loss) <= tol * abs(a.loss) and max(diffs) <= tol else "FAIL"
            row["tolerance"] = f"rel<={tol:g}"
        finally:
            dist.destroy_process_group()
    return [row]


# ------------------------------------------------------------------------------------------ input
def input_feed(plan: Plan, train_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from clipforge.data.sources import StreamOptions, open_source
    from clipforge.tokenizer import Tokenizer
    from clipforge.transforms import fast_train_transform, normalise_uint8, train_transform
    from input_pipeline import write_photo_shards

    try:
        tokenizer: Callable = Tokenizer.from_openai_vocab()
    except FileNotFoundError:  # no packaged vocabulary offline: captions cost nothing then
        print("input: OpenAI's BPE vocabulary not found; captions are not tokenised in this section")
        tokenizer = lambda texts, context_length=77, truncate=True: torch.zeros(  # noqa: E731
            len(texts), context_length, dtype=torch.long
        )
    batch = plan.input_batch
    plain = _name(plan.train_model)  # the eager, unmasked clipforge row: what the GPU consumes
    need = next((r["samples_per_s_best"] for r in train_rows if r.get("row") == plain), None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # 4 shards and 2 batches per worker: every worker completes batches (they are per worker)
        most = max(1, *plan.workers)
        n = most * batch * 2
        write_photo_shards(Path(tmp), n, per_shard=max(1, n // (4 * most)), distinct=plan.photos)
        runs = [(w, True) for w in plan.workers] + [(plan.workers[-1], False)]
        for workers, fast in runs:
            source = open_source("webdataset", {"train": tmp, "shuffle": True, "shuffle_buffer": 64})
            make = fast_train_transform if fast else train_transform
            data = source.dataset(make(plan.input_size, mode="random_resized_crop"), tokenizer, 77)
            opts = StreamOptions(batch_size=batch, workers=workers, pin_memory=plan.device == "cuda")
            stream = iter(source.stream(data, opts))
            next(stream)  # workers started
            sync(plan.device)
            t0, n = time.perf_counter(), 0
            for _ in range(plan.input_batches):
                b = next(stream)
                x = b["image"].to(plan.device, non_blocking=True)
                x = normalise_uint8(x) if x.dtype == torch.uint8 else x
                n += len(x)
            sync(plan.device)
            sps = n / (time.perf_counter() - t0)
            row = {"path": "fast" if fast else "exact", "workers": workers, "batch": batch,
                   "size": plan.input_size, "samples_per_s": sps, "train_needs": need}  # fmt: skip
            if need:
                row["feeds_gpu"] = sps >= need
            rows.append(row)
            del stream
    fast0 = next(r for r in rows if r["path"] == "fast" and r["workers"] == 0)["samples_per_s"]
    for r in rows:
        if need and r["workers"] == 0 and r["path"] == "fast":
            r["workers_needed"] = math.ceil(need / fast0)
    return rows


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every section on the CPU with tiny presets")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument(
        "--compile-backend", default=None,
        help="torch.compile backend of the compiled rows (default: inductor; aot_eager with --dry-run)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_check[_dry].json)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA GPU visible: run with --dry-run to check the script on the CPU")
    plan = make_plan(args.dry_run)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny work: more threads only contend (a shared test machine)
    if args.compile_backend:
        plan.compile_backend = args.compile_backend
    env = environment()
    if plan.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    print(f"gpu_check on {env.get('gpu', 'CPU (dry run)')}, torch {env['torch']}")
    result: dict[str, Any] = {"environment": env, "dry_run": args.dry_run}
    start = time.perf_counter()
    failed = []
    for section in args.only:
        t0 = time.perf_counter()
        try:
            if section == "input":
                rows = input_feed(plan, result.get("train", []))
            else:
                rows = {"parity": parity, "train": train, "ddp": ddp}[section](plan)
        # a section that cannot run (a missing package, no NCCL) is reported as a failure, not fatal
        except Exception as e:
            rows = [{"section": section, "check": f"FAIL: {type(e).__name__}: {str(e)[:200]}"}]
        result[section] = rows
        print(f"\n== {section} ({time.perf_counter() - t0:.0f} s)")
        print(format_table(rows, list(dict.fromkeys(k for r in rows for k in r))))
        failed += [
            f"{section}: {r.get('row') or r.get('model') or r['check']}"
            for r in rows
            if str(r.get("check", "")).startswith("FAIL")
        ]
    result["seconds"] = time.perf_counter() - start
    result["failed"] = failed
    path = write_json(args.out or f"gpu_check{'_dry' if args.dry_run else ''}.json", result)
    print(f"\n{len(failed)} failed check(s){': ' + '; '.join(failed) if failed else ''}; "
          f"{result['seconds']:.0f} s; wrote {path}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
