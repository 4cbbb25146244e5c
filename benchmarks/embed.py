"""Using a model on a collection: end-to-end embedding throughput, search latency, label-embedding reuse.

One run, same JPEG files, same weights, same machine:

1. Embedding images/s from JPEG files on disk (decode + preprocess + model + write):
   - baseline, clip-retrieval style: OpenAI's clip/model.py (loaded by file path) holding the same weights,
     a torch DataLoader with PIL decoding and the standard eval transform, fp32, normalise, np.save;
   - ours fp32 (`clipforge.use.embed`; max abs difference to the baseline's embeddings reported, target
     <= 1e-5), ours bf16 autocast and ours with bf16 weights (`precision="bf16-weights"`; min cosine to
     our fp32, target >= 0.999; both skipped on CPUs without bf16 matrix instructions, where bf16 is
     slower than fp32, unless --bf16-anyway), ours on ONNX Runtime, and
     ours fp32 with fast JPEG decoding at reduced scale (`EmbedOptions.fast_decode`: PIL draft, opt-in
     because it changes pixels; min cosine to our exact fp32).
   Both sides build their model before the clock starts (the baseline from the state dict in memory,
   ours with `open_encoder` from the checkpoint on disk); our load time is reported beside each row.
2. Search latency p50/p99 (one query at a time) for flat / HNSW / IVF-PQ over synthetic unit vectors
   (uniform: the worst case; clustered: closer to real embeddings), with recall@10 against exact search,
   at each index's fixed defaults and at the parameters tuned for recall@10 >= 0.95 (see _search.py).
3. `classify` over N images x L labels with the labels embedded once vs HF pipeline semantics (every
   label re-encoded for every image, one image per forward).

    python benchmarks/embed.py                       # ViT-B-32, 512 640x480 JPEGs, 100k and 1M vectors,
                                                     # classify 1000 images x 100 labels
    python benchmarks/embed.py --quick               # tiny sizes: checks that everything runs
    python benchmarks/embed.py --sections search --index-sizes 100000 --search-data clustered

Section 2's full run is estimated (from faiss' costs and the 100k builds, not yet measured) at about
20 minutes on 2 cores: per set, the HNSW build at 100k (~110 s), the IVF-PQ build at 1M (~5 min:
k-means of 4,000 lists on 256k vectors, then 1M assignments; 33 s at 100k) and each tuning sweep
(capped by --tune-max-s); HNSW at 1M is skipped by --hnsw-max-build-s. Each section's time and the
total are printed; --sections, --index-sizes and --search-data run a part (`--search-data uniform`
saves about half of section 2).

Prints tables and writes benchmarks/results/embed.json. Whether the CPU has bf16 matrix instructions
(AMX / AVX512-BF16) is recorded in the JSON: bf16 is only expected to be faster where it does.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import at_least, bf16_matrix_flags, format_table, write_json
from _search import INDEX_KINDS, SEARCH_COLUMNS, SEARCH_DATA, add_search_args, bench_search
from clipforge import create_model, save_pretrained
from clipforge.checkpoints import convert_clipforge_to_openai
from clipforge.config import PRESETS
from clipforge.models.hardware import slow_bf16_reason
from clipforge.tokenizer import Tokenizer
from clipforge.transforms import PreprocessConfig, eval_transform
from clipforge.use import EmbeddingStore, EmbedOptions, embed, open_encoder
from clipforge.use.classify import Classifier, label_embeddings
from clipforge.use.onnx_export import export_onnx

SECTIONS = ("embed", "search", "classify")


def write_jpegs(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (320, 240)) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    w, h = size
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = rng.integers(0, w - 40), rng.integers(0, h - 40)
            d.ellipse([x, y, x + 40, y + 40], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        p = folder / f"{i:06d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------ 1. embedding
def openai_clip(model):
    path = importlib.metadata.distribution("openai-clip").locate_file("clip/model.py")
    spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sd = {k: v.clone() for k, v in convert_clipforge_to_openai(model.state_dict(), model.config).items()}
    # build_model casts conv/linear/attention weights to fp16 (convert_weights) *before* loading the state
    # dict, so `.float()` alone leaves them fp16-rounded: a different network (4.5e-5 max abs difference
    # in the normalised ViT-B-32 features, in float64 as in float32). Reload the fp32 weights.
    ref = module.build_model(dict(sd)).float()
    ref.load_state_dict(sd)
    return ref.eval()


class Files(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(Image.open(self.paths[i]).convert("RGB"))


def baseline_embed(
    ref, paths, image_size, out: Path, batch_size: int, workers: int
) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    loader = DataLoader(
        Files(paths, eval_transform(PreprocessConfig(image_size))), batch_size, num_workers=workers
    )
    feats = []
    with torch.no_grad():
        for x in loader:
            feats.append(F.normalize(ref.encode_image(x).float(), dim=-1).numpy())
    arr = np.concatenate(feats)
    np.save(out, arr)
    return time.perf_counter() - t0, arr


def ours(photos, out, model, runtime="torch", precision="fp32", batch_size=32, workers=2, fast_decode=False):
    """(seconds to embed, seconds to load the model, vectors in file order)."""
    opts = EmbedOptions(
        batch_size=batch_size, workers=workers, dtype="float32", progress=False, fast_decode=fast_decode
    )
    t0 = time.perf_counter()
    enc = open_encoder(model, runtime, precision=precision)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    embed(photos, out, enc, options=opts)
    seconds = time.perf_counter() - t0
    store = EmbeddingStore(out)
    return seconds, load_s, store.vectors(np.arange(store.count))


def bench_embedding(args, work: Path) -> list[dict]:
    """Every row once per round, rounds interleaved (a machine's drift hits all rows alike); each row
    reports its best round (images_per_s) and its median."""
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    ckpt = save_pretrained(model, work / "ckpt", tokenizer=Tokenizer.from_openai_vocab())
    paths = write_jpegs(work / "photos", args.images, size=args.photo_size)
    export_onnx(ckpt, work / "onnx")
    n, size = len(paths), model.config.vision.image_size
    common = {"batch_size": args.batch_size, "workers": args.workers}
    runs = {
        "ours fp32": lambda out: ours(work / "photos", out, ckpt, **common),
        "ours bf16 autocast": lambda out: ours(work / "photos", out, ckpt, precision="bf16", **common),
        "ours bf16 weights": lambda out: ours(work / "photos", out, ckpt, precision="bf16-weights", **common),
        "ours ONNX Runtime": lambda out: ours(work / "photos", out, work / "onnx", runtime="onnx", **common),
        "ours fp32 + fast decode": lambda out: ours(work / "photos", out, ckpt, fast_decode=True, **common),
    }
    if (slow := slow_bf16_reason()) and not args.bf16_anyway:
        print(f"no bf16 rows: {slow} (--bf16-anyway runs them)", file=sys.stderr)
        del runs["ours bf16 autocast"], runs["ours bf16 weights"]
    baseline = "baseline (OpenAI model.py, PIL, fp32)"
    try:
        ref = openai_clip(model)

        def run_baseline(out: Path):
            seconds, vectors = baseline_embed(ref, paths, size, out.with_suffix(".npy"), **common)
            return seconds, None, vectors  # its model is built before the clock

        runs = {baseline: run_baseline, **runs}
    except importlib.metadata.PackageNotFoundError:
        print("openai-clip is not installed: no baseline row", file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name in runs}
    loads: dict[str, float | None] = {}
    vectors: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        for i, (name, run) in enumerate(runs.items()):
            seconds, loads[name], vectors[name] = run(work / f"round{r}_{i}")
            times[name].append(seconds)
    fp32 = vectors["ours fp32"]
    # OpenAI's build_model assumes 64-wide heads: only then does the baseline hold the same network
    same_net = model.config.vision.heads == model.config.vision.width // 64
    rows = []
    for name in runs:
        row = {
            "row": name,
            "images_per_s": n / min(times[name]),
            "images_per_s_median": n / float(np.median(times[name])),
            "rounds": len(times[name]),
            "load_s": loads[name],
        }
        if name == "ours fp32" and baseline in vectors:
            row["max_abs_diff_to_baseline"] = (
                float(np.abs(fp32 - vectors[baseline]).max()) if same_net else "n/a: heads not 64 wide"
            )
        elif name.startswith("ours") and name != "ours fp32":
            row["min_cosine_to_fp32"] = float((vectors[name] * fp32).sum(1).min())
        rows.append(row)
    base_rate = rows[0]["images_per_s"] if baseline in runs else None
    for r in rows:
        r["vs_baseline"] = r["images_per_s"] / base_rate if base_rate else None
    return rows


# ------------------------------------------------------------------------------------------ 2. search
# in _search.py (bench_search, its arguments and columns)


# ------------------------------------------------------------------------------------------ 3. classify
def bench_classify(args, work: Path) -> list[dict]:
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    enc = open_encoder(model)
    paths = write_jpegs(work / "cls", args.classify_images, seed=1)
    labels = [f"a photo of object number {i}" for i in range(args.labels)]
    t0 = time.perf_counter()
    Classifier(enc, labels).classify(paths, top_k=5, batch_size=args.batch_size, workers=args.workers)
    once = time.perf_counter() - t0
    slow = paths[: args.classify_baseline_images]  # its rate is per image: a subset times it as well
    t0 = time.perf_counter()
    for p in slow:  # HF pipeline semantics: the labels are re-encoded for every image, one image per forward
        from clipforge import load_image

        w = label_embeddings(enc, labels)
        f = enc.encode_pixels(enc.preprocess(load_image(p))[None])
        (enc.logit_scale * f @ w.T).softmax(-1).topk(5)
    per_image = time.perf_counter() - t0
    n, k = len(paths), len(slow)
    return [
        {
            "mode": "labels once, batched",
            "images": n,
            "labels": args.labels,
            "images_per_s": n / once,
            "vs_labels_per_image": (n / once) / (k / per_image),  # both timed in this call
        },
        {
            "mode": "labels per image (HF pipeline)",
            "images": k,
            "labels": args.labels,
            "images_per_s": k / per_image,
        },
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--images", type=at_least(1), default=512)
    p.add_argument(
        "--photo-size",
        default="640x480",
        help="WxH of the embedded JPEGs (a web photo: fast decoding halves it for a 224 px model; "
        "at 320x240 it has nothing to skip)",
    )
    p.add_argument("--batch-size", type=at_least(1), default=32)
    p.add_argument("--workers", type=at_least(0), default=2)
    p.add_argument(
        "--rounds", type=at_least(1), default=2, help="embedding rows: interleaved rounds, best reported"
    )
    p.add_argument(
        "--bf16-anyway",
        action="store_true",
        help="run the bf16 row on a CPU without bf16 matrix instructions too (5x-400x slower there)",
    )
    add_search_args(p)
    p.add_argument("--classify-images", type=at_least(1), default=1000)
    p.add_argument("--labels", type=at_least(1), default=100)
    p.add_argument(
        "--classify-baseline-images",
        type=at_least(1),
        default=100,
        help="images the HF-pipeline-semantics loop times (it re-encodes every label per image: ~0.5 s each)",
    )
    p.add_argument("--sections", default=",".join(SECTIONS), help="which sections to run (comma-separated)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (tiny-vit, 32 images, 5k vectors)")
    p.add_argument("--out", default="embed.json")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.images, args.index_sizes, args.dim = "tiny-vit", 32, "5000", 64
        args.queries, args.classify_images, args.labels, args.workers = 20, 16, 10, 0
        args.photo_size = "320x240"
    try:
        args.photo_size = tuple(at_least(1)(v) for v in str(args.photo_size).lower().split("x"))
    except argparse.ArgumentTypeError as e:
        p.error(f"--photo-size {args.photo_size}: {e}")
    try:
        args.index_sizes = sorted(at_least(10)(s) for s in str(args.index_sizes).split(","))  # recall@10
    except argparse.ArgumentTypeError as e:
        p.error(f"--index-sizes {args.index_sizes}: {e}")
    if len(args.photo_size) != 2:
        p.error(f"--photo-size wants WxH, e.g. 640x480, not {'x'.join(map(str, args.photo_size))}")
    args.search_data = args.search_data.split(",")
    args.index_kinds = args.index_kinds.split(",")
    sections = args.sections.split(",")
    for option, given, known in (
        ("--sections", sections, SECTIONS),
        ("--search-data", args.search_data, SEARCH_DATA),
        ("--index-kinds", args.index_kinds, INDEX_KINDS),
    ):
        if unknown := [v for v in given if v not in known]:
            p.error(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.model not in PRESETS:
        p.error(f"--model {args.model}: unknown preset; choose from {', '.join(PRESETS)}")
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    emb = search = cls = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "embed" in sections:
            t0 = time.perf_counter()
            emb = bench_embedding(args, work)
            seconds["embed"] = time.perf_counter() - t0
            print(
                f"\nEmbedding {args.images} JPEG files of {args.photo_size[0]}x{args.photo_size[1]} with "
                f"{args.model} (decode + preprocess + model + write), {seconds['embed']:.0f} s:"
            )
            print(
                format_table(
                    emb,
                    [
                        "row",
                        "images_per_s",
                        "images_per_s_median",
                        "vs_baseline",
                        "load_s",
                        "max_abs_diff_to_baseline",
                        "min_cosine_to_fp32",
                    ],
                )
            )
        if "search" in sections:
            t0 = time.perf_counter()
            search = bench_search(args, work)
            seconds["search"] = time.perf_counter() - t0
            print(
                f"\nSearch latency, one query at a time, d = {args.dim}, recall@10 on fresh queries "
                f"({seconds['search']:.0f} s):"
            )
            print(format_table(search, SEARCH_COLUMNS))
        if "classify" in sections:
            t0 = time.perf_counter()
            cls = bench_classify(args, work)
            seconds["classify"] = time.perf_counter() - t0
            print(f"\nZero-shot classify ({seconds['classify']:.0f} s):")
            print(format_table(cls, ["mode", "images", "labels", "images_per_s", "vs_labels_per_image"]))
    seconds["total"] = time.perf_counter() - start
    path = write_json(
        args.out,
        {
            "args": vars(args),
            "bf16_matrix_instructions": bf16_matrix_flags(),
            "bf16_slow_reason": slow_bf16_reason(),
            "seconds": seconds,
            "embedding": emb,
            "search": search,
            "search_data": {
                "uniform": "isotropic Gaussian directions (worst case for approximate indexes)",
                "clustered": "1,000 Gaussian clusters, points centre + N(0, I), normalised (closer to "
                "real embeddings)",
                "queries": "fresh draws of the same distribution, not indexed; recall@10 vs exact numpy",
            },
            "classify": cls,
        },
    )
    print(f"\nwrote {path}; total {seconds['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
