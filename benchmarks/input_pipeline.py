"""Training input pipeline: WebDataset shards of real-size JPEGs -> a training batch, per CPU core.

    python benchmarks/input_pipeline.py                  # 256 photos, 64/224/336 px, both crops
    python benchmarks/input_pipeline.py --quick          # 24 photos, 64 px: checks that it runs (seconds)
    python benchmarks/input_pipeline.py --train          # + the end-to-end training row (shards vs memory)
    python benchmarks/input_pipeline.py --threads 1 --cpu-time   # per-core figures on a shared machine

The benchmark writes its own shards: photo-like images (clipforge.data.drawing.photo_like: smooth
regions, sharp objects, texture and noise) of 400-800 px a side, JPEG quality 90 (~110 KB each), with a
caption, in the img2dataset layout (`<key>.jpg`, `<key>.txt`).

Three pipelines, each for the paper's square crop (resize the short side, random S x S crop) and for
RandomResizedCrop(S, scale=(0.9, 1)) (OpenCLIP's default), at 64, 224 and 336 px:

- baseline: OpenCLIP's path, written here with PIL/numpy because torchvision is not installed:
  webdataset's `decode("pilrgb")` (full decode + convert("RGB")), torchvision's rules on PIL images
  (Resize + RandomCrop, or RandomResizedCrop's crop then resize, bicubic), ToTensor (copy to a float
  tensor / 255), Normalize (sub_, div_), collate (torch.stack);
- exact: clipforge's `TrainTransform` (the same pixels as torchvision's rules, float output);
- fast: clipforge's `FastTrainTransform` (data.fast_decode=true): JPEG decoded at 1/2 or 1/4 scale when
  the crop allows, only the crop box resized (torch's antialiased uint8 kernel, PIL's bicubic filter)
  straight into a uint8 tensor; normalisation happens on the device in the step (its CPU cost, shown as
  `norm_dev_ms`, is not counted in the pipeline's samples/s).

Two measurements per row. `ms/sample` columns: the stages timed one by one in a single loop over the
samples (read = tar iteration, decode, resize, crop, to_tensor, normalise, collate; for the fast path the
crop and the copy into a tensor are part of the resize, and there is no normalise). `samples/s/core`:
the real streams end to end, untimed inside: webdataset's own pipeline for the baseline, clipforge's
WebDataset source + batch stream for exact and fast (captions tokenised in all three; clipforge's
streams also seed each sample's crop, data/seeding.py), samples per CPU-second of this process (with
--threads 1 one core).

`--train`: `clipforge train`'s trainer (build_trainer, data.kind=webdataset) on a small model: samples/s
of Trainer.train_step over batches already in memory, of the data stream alone (workers=0), and of
the two together for each --workers value. The run is input-bound when the stream is slower than the
step; `workers_needed` = ceil(step rate / single-process stream rate) is the data.workers setting that
feeds it (on a machine with that many spare cores).
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import at_least, environment, format_table, write_json
from clipforge.config import PRESETS
from clipforge.data.drawing import photo_like
from clipforge.data.wds import iter_samples
from clipforge.transforms import (
    OPENAI_MEAN,
    OPENAI_STD,
    EncodedImage,
    fast_train_transform,
    load_image,
    normalise_uint8,
    train_transform,
)

MODES = ("square_crop", "random_resized_crop")
PIPELINES = ("baseline", "exact", "fast")
STAGES = ("read", "decode", "resize", "crop", "to_tensor", "normalise", "collate")


# ------------------------------------------------------------------------------------------ shards
def write_photo_shards(
    out: Path, n: int, per_shard: int = 64, seed: int = 0, distinct: int | None = None
) -> list[str]:
    """n photo-like JPEGs of 400-800 px a side in shards of `per_shard` (kept when already there); with
    `distinct`, that many different photos repeated (the same decode cost, less time making them)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    made: dict[int, tuple[bytes, int, int]] = {}
    urls = []
    for s in range(math.ceil(n / per_shard)):
        path = out / f"{s:06d}.tar"
        urls.append(str(path))
        if path.exists():
            continue
        tmp = path.with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tar:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                j = i % distinct if distinct else i
                if j not in made:
                    w, h = int(rng.integers(400, 801)), int(rng.integers(400, 801))
                    buf = io.BytesIO()
                    photo_like(w, h, seed=seed * 1_000_003 + j).save(buf, "JPEG", quality=90)
                    made = made if distinct else {}
                    made[j] = buf.getvalue(), w, h
                jpeg, w, h = made[j]
                caption = f"a photo number {i} of {w} by {h} pixels".encode()
                for name, data in ((f"{i:09d}.jpg", jpeg), (f"{i:09d}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tmp.replace(path)
    return urls


# ------------------------------------------------------------------------------------------ baseline
# OpenCLIP's image path with torchvision's rules, in PIL/numpy (torchvision is not installed here).
def tv_resize(img: Image.Image, size: int) -> Image.Image:
    """torchvision Resize(size, BICUBIC) on a PIL image: the short side to size."""
    w, h = img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img.resize(new, Image.Resampling.BICUBIC)


def tv_random_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    top = int(torch.randint(0, h - size + 1, (1,)))
    left = int(torch.randint(0, w - size + 1, (1,)))
    return img.crop((left, top, left + size, top + size))


def tv_rrc_box(img: Image.Image, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params -> (left, top, right, bottom)."""
    width, height = img.size
    area = width * height
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*scale).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,)))
            left = int(torch.randint(0, width - w + 1, (1,)))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def tv_to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision ToTensor: HWC uint8 -> CHW float in [0, 1] (a copy, a permute, a contiguous copy)."""
    x = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(img.size[1], img.size[0], 3)
    return x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)


_MEAN, _STD = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)


def tv_normalize(x: torch.Tensor) -> torch.Tensor:
    return x.sub_(_MEAN).div_(_STD)


def baseline_transform(mode: str, size: int) -> Callable[[Image.Image], torch.Tensor]:
    def square(img: Image.Image) -> torch.Tensor:
        return tv_normalize(tv_to_tensor(tv_random_crop(tv_resize(img, size), size).convert("RGB")))

    def rrc(img: Image.Image) -> torch.Tensor:
        crop = img.crop(tv_rrc_box(img)).resize((size, size), Image.Resampling.BICUBIC)
        return tv_normalize(tv_to_tensor(crop.convert("RGB")))

    return square if mode == "square_crop" else rrc


# ------------------------------------------------------------------------------------------ stage timing
class Stages:
    """CPU seconds per stage (the calling thread's clock, or wall time)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock, self.t = clock, dict.fromkeys(STAGES, 0.0)

    def run(self, stage: str, fn: Callable, *args: Any) -> Any:
        t0 = self.clock()
        out = fn(*args)
        self.t[stage] += self.clock() - t0
        return out


def _raw(urls: list[str], stages: Stages) -> Iterator[dict[str, Any]]:
    it = iter_samples(urls, handler=lambda exn: False)
    while True:
        sample = stages.run("read", next, it, None)
        if sample is None:
            return
        yield sample


def staged(pipeline: str, mode: str, size: int, urls: list[str], batch: int, clock) -> dict[str, float]:
    """ms per sample in each stage, one sample at a time, in one loop over the shards."""
    st = Stages(clock)
    exact, fast = train_transform(size, mode=mode), fast_train_transform(size, mode=mode)
    base_rrc = mode == "random_resized_crop"
    out: list[torch.Tensor] = []
    n = norm_dev = 0
    for sample in _raw(urls, st):
        data = sample["jpg"]
        if pipeline == "baseline":  # webdataset "pilrgb": PIL.Image.open + load + convert("RGB")
            img = st.run("decode", lambda d: Image.open(io.BytesIO(d)).convert("RGB"), data)
            if base_rrc:
                img = st.run("crop", lambda i: i.crop(tv_rrc_box(i)), img)
                img = st.run("resize", lambda i: i.resize((size, size), Image.Resampling.BICUBIC), img)
            else:
                img = st.run("resize", tv_resize, img, size)
                img = st.run("crop", tv_random_crop, img, size)
            x = st.run("to_tensor", tv_to_tensor, img)
            x = st.run("normalise", tv_normalize, x)
        elif pipeline == "exact":  # clipforge's TrainTransform, its steps in its order
            img = st.run("decode", load_image, io.BytesIO(data))
            x = st.run("resize", exact, img)  # resize + crop + tensor + normalise, one call
        else:
            img, box = st.run("decode", fast.decode, EncodedImage(data, "x.jpg"))
            x = st.run("resize", fast.crop_resize, img, box)  # crop box only, straight to a uint8 tensor
        out.append(x)
        n += 1
        if len(out) == batch:
            b = st.run("collate", torch.stack, out)
            if pipeline == "fast":  # on the device in training; timed here on the CPU, kept apart
                t0 = clock()
                normalise_uint8(b)
                norm_dev += clock() - t0
            out = []
    res = {f"{k}_ms": 1e3 * v / max(n, 1) for k, v in st.t.items()}
    res["total_ms"] = sum(1e3 * v / max(n, 1) for v in st.t.values())
    res["norm_dev_ms"] = 1e3 * norm_dev / max(n, 1)
    return res


# ------------------------------------------------------------------------------------------ real streams
def _tokenizer():
    from clipforge.tokenizer import Tokenizer

    return Tokenizer.from_openai_vocab()


def baseline_stream(urls: list[str], mode: str, size: int, batch: int, tokenizer) -> Iterator[Any]:
    """OpenCLIP's get_wds_dataset pipeline, minus shuffling: decode pilrgb, map, to_tuple, batched."""
    import webdataset as wds

    pipe = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        wds.decode("pilrgb"),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=baseline_transform(mode, size), text=lambda t: tokenizer([t])[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch, partial=False),
    )
    return iter(pipe)


def clipforge_stream(urls: list[str], mode: str, size: int, batch: int, tokenizer, fast: bool):
    from clipforge.data.sources import StreamOptions, open_source

    source = open_source("webdataset", {"train": "::".join(urls), "shuffle": False})
    transform = (fast_train_transform if fast else train_transform)(size, mode=mode)
    data = source.dataset(transform, tokenizer, 77)
    return iter(source.stream(data, StreamOptions(batch_size=batch)))


def stream_rate(make: Callable[[], Iterator[Any]], batches: int, clock) -> float:
    """Samples per second (CPU or wall) of a batch stream over `batches` batches after one warm-up."""
    it = make()
    next(it)
    t0, n = clock(), 0
    for _ in range(batches):
        b = next(it)
        n += len(b[0] if isinstance(b, tuple | list) else b["image"])
    return n / max(clock() - t0, 1e-9)


# ------------------------------------------------------------------------------------------ --train
def train_rows(shard_dir: Path, args, clock) -> list[dict[str, Any]]:
    """clipforge train from shards vs from memory on the same model (see the module docstring)."""
    from clipforge.train.build import build_trainer
    from clipforge.train.experiment import load_experiment

    rows = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as out:
            exp = load_experiment(
                None,
                [
                    f"model.preset={args.train_preset}",
                    "data.kind=webdataset",
                    f"data.train={shard_dir}",
                    "data.augment=random_resized_crop",
                    f"data.fast_decode={args.train_fast}",
                    f"data.workers={workers}",
                    "data.shuffle_buffer=16",
                    f"train.batch_size={args.train_batch}",
                    f"train.steps={args.train_steps * 4}",
                    "train.device=cpu",
                    f"run.output_dir={out}",
                    "run.tensorboard=false",
                ],
            )
            built = build_trainer(exp, progress=False)
            stream, trainer = iter(built.data), built.trainer
            held = [next(stream) for _ in range(args.train_steps)]  # the same batches, in memory
            trainer.train_step(held[0])  # warm-up
            t0 = clock()
            for b in held:
                trainer.train_step(b)
            memory = len(held) * args.train_batch / (clock() - t0)
            t0 = clock()
            for _ in range(args.train_steps):
                next(stream)
            data_only = args.train_steps * args.train_batch / (clock() - t0)
            t0 = clock()
            for _ in range(args.train_steps):
                trainer.train_step(next(stream))
            shards = args.train_steps * args.train_batch / (clock() - t0)
        row = {
            "preset": args.train_preset,
            "fast_decode": args.train_fast,
            "workers": workers,
            "memory_sps": memory,
            "stream_sps": data_only,
            "shards_sps": shards,
            "input_bound": shards < 0.9 * memory,
        }
        if workers == 0:
            row["workers_needed"] = math.ceil(memory / data_only)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="24 photos, 64 px, 2 batches: a check that it runs")
    p.add_argument("--images", type=at_least(2), default=256, help="at least 2 batches")
    p.add_argument("--sizes", type=at_least(1), nargs="+", default=[64, 224, 336])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batch", type=at_least(1), default=32)
    p.add_argument("--shards", default=None, help="folder for the benchmark's shards (default: a temp dir)")
    p.add_argument(
        "--threads", type=at_least(1), default=1, help="torch threads (default 1: per-core figures)"
    )
    p.add_argument("--cpu-time", action="store_true", help="time by CPU time (robust on a shared machine)")
    p.add_argument("--train", action="store_true", help="add the end-to-end training rows")
    p.add_argument("--train-preset", default="small-vit", choices=list(PRESETS), metavar="PRESET")
    p.add_argument("--train-batch", type=at_least(1), default=64)
    p.add_argument("--train-steps", type=at_least(1), default=8)
    p.add_argument("--train-fast", default="true", choices=("true", "false"))
    p.add_argument("--workers", type=at_least(0), nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--rounds", type=at_least(1), default=3, help="stream measurements per pipeline, interleaved"
    )
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/input_pipeline.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.sizes, args.batch = 24, [64], 8
        args.train_preset, args.train_batch, args.train_steps, args.workers = "tiny-vit", 8, 2, [0]
    if args.images < 2 * args.batch:  # one warm-up batch, then at least one timed (partial batches dropped)
        p.error(f"--images {args.images} gives fewer than 2 batches of --batch {args.batch}")
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    tmp = None
    if args.shards is None:
        tmp = tempfile.TemporaryDirectory()
        shard_dir = Path(tmp.name) / "shards"
    else:
        shard_dir = Path(args.shards)
    try:
        urls = write_photo_shards(shard_dir, args.images, per_shard=min(64, args.images))
        tokenizer = _tokenizer()
        batches = max(1, args.images // args.batch - 1)
        rows = []
        for mode in args.modes:
            for size in args.sizes:
                makes, group = {}, []
                for pipe in PIPELINES:
                    row: dict[str, Any] = {"mode": mode, "size": size, "pipeline": pipe}
                    row.update(staged(pipe, mode, size, urls, args.batch, clock))
                    if pipe == "baseline":
                        makes[pipe] = functools.partial(
                            baseline_stream, urls, mode, size, args.batch, tokenizer
                        )
                    else:
                        makes[pipe] = functools.partial(
                            clipforge_stream, urls, mode, size, args.batch, tokenizer, pipe == "fast"
                        )
                    group.append(row)
                # the streams interleaved, round after round: drift of a shared machine hits all alike
                rates: dict[str, list[float]] = {pipe: [] for pipe in PIPELINES}
                for _ in range(args.rounds):
                    for pipe in PIPELINES:
                        rates[pipe].append(stream_rate(makes[pipe], batches, clock))
                base = rates["baseline"]
                for row in group:
                    mine = rates[row["pipeline"]]
                    row["samples_per_s_core"] = statistics.median(mine)
                    row["x_baseline"] = statistics.median(mine) / statistics.median(base)
                    row["x_baseline_rounds"] = [round(a / b, 3) for a, b in zip(mine, base)]
                rows.extend(group)
        cols = ["mode", "size", "pipeline", *[f"{s}_ms" for s in STAGES], "total_ms", "norm_dev_ms"]
        print(format_table(rows, [*cols, "samples_per_s_core", "x_baseline", "x_baseline_rounds"]))
        print(f"samples_per_s_core: median of {args.rounds} interleaved rounds; x_baseline: ratio of medians")
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "shards")}
        result: dict[str, Any] = {"args": settings, "rows": rows, "images": args.images, "batch": args.batch}
        if args.train:
            result["train"] = train_rows(shard_dir, args, clock)
            print()
            print(format_table(result["train"], list(result["train"][0])))
        result["environment"] = environment()
        result["clock"] = "process CPU time" if args.cpu_time else "wall"
        path = write_json(args.out or f"input_pipeline{'_quick' if args.quick else ''}.json", result)
        print(f"\nwrote {path}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
