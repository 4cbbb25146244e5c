"""The evaluation suite end to end on the built-in synthetic shapes, offline, on CPU in a few minutes.

    python examples/eval_synthetic.py --out eval_synthetic_out --steps 500 --seed 0

1. Trains a tiny CLIP on synthetic image-caption pairs (a small ModifiedResNet + 2-layer text tower, a BPE
   vocabulary trained on the captions) and saves `save_pretrained` snapshots over the run (the "models"
   of the robustness scatter), or takes a clipforge model directory via --model.
2. Writes class-folder sets with `clipforge.data.export`: train (64 colour-shape classes, images of the
   51 seen combinations), the in-distribution test set and its shifted versions (background, texture,
   noise, style, blur), and images of the 13 held-out combinations.
3. Per snapshot: zero-shot and supervised probes (full linear probe; plain 2- and 8-shot probes) on the
   in-distribution and shifted sets; the probes are the baseline whose logit-axis line defines effective
   robustness (the CLIP paper's Fig. 14 picture: classifiers adapted to the training distribution vs
   zero-shot).
4. Writes tasks.yaml and runs `clipforge eval suite` on the final model: zero-shot (seen / unseen), linear
   probe, few-shot (k = 1..16, several seeds, plain vs zero-shot-prior probe), robustness per shift with
   the probes' baseline line.

Outputs under --out: data/, models/step_*/, tasks.yaml, suite/ (suite.json, suite.md, few-shot and
robustness PNGs, confusion matrix), summary.json, summary.md, robustness_snapshots.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from clipforge.checkpoints import load, save_pretrained
from clipforge.config import VisionConfig, get_config
from clipforge.data.export import write_class_folders, write_robustness_sets
from clipforge.data.memory import TensorPairs
from clipforge.data.streams import BatchStream
from clipforge.data.synthetic import SHIFTS, ShapesConfig, classification_set, make_tensors
from clipforge.eval import encode_images, fit_logit_line, plot_robustness, zero_shot_classifier
from clipforge.eval.datasets import ImageFolderDataset
from clipforge.eval.fewshot import few_shot_probe, sample_k_shot
from clipforge.eval.linear_probe import linear_probe, predict_logits
from clipforge.eval.robustness import effective_robustness
from clipforge.models import create_model
from clipforge.tokenizer import train_bpe
from clipforge.train.optim import build_optimizer, cosine_schedule
from clipforge.train.runs import RunDir, seed_everything
from clipforge.train.step import make_step_fn
from clipforge.train.trainer import Trainer
from clipforge.transforms import PreprocessConfig

# The captions' own phrasing (data/synthetic_scenes.py), so the prompts use words the BPE vocabulary knows.
TEMPLATES = [
    "a {c}",
    "a photo of a {c}",
    "there is a {c}.",
    "a drawing of a {c}",
    "a simple illustration of a {c}.",
]
SHIFTED = [s for s in SHIFTS if s != "none"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="eval_synthetic_out")
    p.add_argument("--steps", type=int, default=500, help="training steps (ignored with --model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="a clipforge model directory instead of training one")
    p.add_argument("--snapshots", type=int, default=5, help="models saved over the run (robustness points)")
    p.add_argument("--train-pairs", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-per-class", type=int, default=20, help="labelled images per class (probes)")
    p.add_argument("--test-per-class", type=int, default=10, help="test images per class (and per shift)")
    p.add_argument("--ks", default="1,2,4,8,16")
    p.add_argument("--fewshot-seeds", type=int, default=3)
    p.add_argument(
        "--probe-shots", default="2,8", help="plain k-shot probes that join the full probe in the baseline"
    )
    p.add_argument("--colours", help="comma list (default: all 8); fewer colours/shapes = fewer classes")
    p.add_argument("--shapes", help="comma list (default: all 8)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ data
def write_data(shapes: ShapesConfig, out: Path, train_per_class: int, test_per_class: int) -> dict:
    """Class folders: train (split "train"), test + shifted (split "seen_eval"), unseen (held-out combos)."""
    paths = {}
    x, y, names = classification_set(shapes, train_per_class, "train")
    paths["train"] = write_class_folders(x, y, names, out / "train")
    shifted = write_robustness_sets(shapes, out / "shifts", test_per_class, "seen_eval")
    paths["test"] = shifted.pop("none")
    paths["shifted"] = shifted
    x, y, names = classification_set(shapes, test_per_class, "unseen")
    paths["unseen"] = write_class_folders(x, y, names, out / "unseen")
    return paths


# -------------------------------------------------------------------------------------------- training
def model_config(vocab_size: int, image_size: int):
    """The demo's recipe: a small ModifiedResNet image tower (learns shapes quickly), 2-layer text tower."""
    base = get_config("demo-vit")
    vision = VisionConfig(kind="resnet", image_size=image_size, width=16, layers=(1, 1, 1, 1), heads=8)
    text = replace(base.text, vocab_size=vocab_size, width=128, layers=2, heads=2)
    return base.replace(embed_dim=128, vision=vision, text=text)


def precision() -> str:
    """bf16 autocast where oneDNN has native bf16 kernels, else fp32."""
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"


def train_snapshots(shapes: ShapesConfig, args: argparse.Namespace, out: Path) -> list[Path]:
    """Train briefly with the library's Trainer; save_pretrained a snapshot every steps / snapshots."""
    seed_everything(args.seed)
    images, captions = make_tensors(shapes, args.train_pairs, "train")
    tokenizer = train_bpe(captions, vocab_size=640, context_length=32)
    model = create_model(model_config(tokenizer.vocab_size, shapes.image_size))
    tokens = tokenizer(captions, context_length=model.context_length, truncate=True)
    data = BatchStream(TensorPairs(images, tokens), args.batch_size, seed=args.seed)
    optimizer = build_optimizer(model, 2e-3, 0.1, (0.9, 0.98), 1e-6)
    every = max(1, args.steps // max(1, args.snapshots))
    saved: list[Path] = []

    def snapshot(m) -> dict:  # an "evaluator" that writes the model: the trainer calls it every `every` steps
        path = out / f"step_{trainer.step:05d}"
        save_pretrained(m, path, tokenizer=tokenizer, preprocess=PreprocessConfig(shapes.image_size))
        saved.append(path)
        return {}

    trainer = Trainer(
        model,
        make_step_fn("clip"),
        optimizer,
        cosine_schedule(optimizer, min(30, args.steps // 10), args.steps),
        data,
        steps=args.steps,
        batch_size=args.batch_size,
        run_dir=RunDir(out / "run"),
        precision=precision(),
        grad_clip=1.0,
        evaluators={"snapshot": snapshot},
        eval_every=every,
        checkpoint_every=0,
        after_step=lambda m: m.clamp_logit_scale(),
        scalars=lambda m: {"logit_scale": m.logit_scale.exp().item()},
        progress=not args.quiet,
    )
    result = trainer.fit()
    print(f"trained {args.steps} steps, final loss {result.losses[-1]:.3f}; snapshots: {len(saved)}")
    return sorted(set(saved))


# ---------------------------------------------------------------------------------- per-model analysis
def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(-1).cpu() == y).double().mean().item()


def analyse(model_dir: Path, data: dict, probe_shots: list[int], progress: bool) -> dict:
    """Zero-shot and probe accuracies of one model on the test set ("in") and every shifted set."""
    model, preprocess, tokenizer = load(model_dir)
    sets = {"in": data["test"], **data["shifted"]}
    feats = {}
    for name, path in {"train": data["train"], **sets}.items():
        ds = ImageFolderDataset(path, preprocess, Path(path) / "classnames.json")
        feats[name] = encode_images(model, ds, batch_size=128, progress=progress, desc=name)
    classnames = ds.classnames
    clf = zero_shot_classifier(model, tokenizer, classnames, TEMPLATES).cpu()
    xtr, ytr = feats["train"]
    probes = {"probe": linear_probe(xtr, ytr, num_classes=len(classnames))}
    classifiers = {
        "zero-shot": (clf, torch.zeros(len(classnames))),
        "probe": (probes["probe"].weight, probes["probe"].bias),
    }
    for k in probe_shots:
        idx = sample_k_shot(ytr, k, seed=0)
        w, b, _ = few_shot_probe(xtr[idx].double(), ytr[idx], len(classnames))
        classifiers[f"probe-k{k}"] = (w, b)
    return {
        kind: {s: accuracy(predict_logits(feats[s][0].to(w), w, b), feats[s][1]) for s in sets}
        for kind, (w, b) in classifiers.items()
    }


def baseline_lines(rows: dict) -> dict[str, tuple[float, float]]:
    """Per shift (and "mean" over shifts): the logit-axis line through all supervised probes' points."""
    probes = [acc for accs in rows.values() for kind, acc in accs.items() if kind != "zero-shot"]
    lines = {s: fit_logit_line([a["in"] for a in probes], [a[s] for a in probes]) for s in SHIFTED}
    lines["mean"] = fit_logit_line([a["in"] for a in probes], [mean_shift(a) for a in probes])
    return lines


def mean_shift(acc: dict) -> float:
    return sum(acc[s] for s in SHIFTED) / len(SHIFTED)


# --------------------------------------------------------------------------------------------- suite
def write_tasks(path: Path, model_dir: Path, data: dict, lines: dict, args) -> Path:
    import yaml

    test, train = str(data["test"]), str(data["train"])
    names = str(Path(data["test"]) / "classnames.json")
    tasks = [
        {"task": "zeroshot", "dataset": test, "name": "shapes-seen", "per_class": True},
        {"task": "zeroshot", "dataset": str(data["unseen"]), "name": "shapes-unseen"},
        {"task": "linear-probe", "dataset": test, "train": train, "name": "shapes-seen"},
        {
            "task": "few-shot",
            "dataset": test,
            "train": train,
            "name": "shapes-seen",
            "ks": [int(k) for k in args.ks.split(",")],
            "seeds": list(range(args.fewshot_seeds)),
        },
    ]
    tasks += [
        {
            "task": "robustness",
            "dataset": test,
            "name": f"shapes-{s}",
            "shifted": {s: str(data["shifted"][s])},
            "baseline_fit": list(lines[s]),
        }
        for s in SHIFTED
    ]
    spec = {
        "model": str(model_dir),
        "pretrained": "synthetic-shapes",
        "output_dir": str(path.parent / "suite"),
        "cache_dir": str(path.parent / "cache"),
        "classnames": names,
        "templates": str(path.parent / "templates.json"),
        "batch_size": 128,
        "tasks": tasks,
    }
    (path.parent / "templates.json").write_text(json.dumps(TEMPLATES, indent=1) + "\n")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def fewshot_table(curve: dict) -> str:
    lines = [
        f"zero-shot top-1: {100 * curve['zero_shot']:.1f}%",
        "| k | plain probe | zero-shot-prior probe | prior - plain |",
        "|---|---|---|---|",
    ]
    plain, prior = curve["linear_probe"], curve["zero_shot_prior"]
    for i, k in enumerate(curve["k"]):
        d = [b - a for a, b in zip(plain["runs"][i], prior["runs"][i])]
        lines.append(
            f"| {k} | {100 * plain['mean'][i]:.1f} ± {100 * plain['std'][i]:.1f} "
            f"| {100 * prior['mean'][i]:.1f} ± {100 * prior['std'][i]:.1f} "
            f"| {100 * sum(d) / len(d):+.1f} (min {100 * min(d):+.1f}) |"
        )
    return "\n".join(lines) + "\n"


def snapshot_table(rows: dict, lines: dict) -> str:
    head = ["model", "classifier", "in-dist", *SHIFTED, "mean shift", "eff. rob. (mean)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, accs in rows.items():
        for kind, a in accs.items():
            er = effective_robustness(a["in"], mean_shift(a), lines["mean"])
            vals = [f"{100 * a[s]:.1f}" for s in ("in", *SHIFTED)] + [
                f"{100 * mean_shift(a):.1f}",
                f"{100 * er:+.1f}",
            ]
            out.append("| " + " | ".join([name, kind, *vals]) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    t0 = time.perf_counter()
    out = Path(args.out)
    kinds = {k: tuple(getattr(args, k).split(",")) for k in ("colours", "shapes") if getattr(args, k)}
    shapes = ShapesConfig(image_size=64, seed=args.seed, p_single=0.8, p_count=0.1, **kinds)

    print("writing class-folder sets ...", flush=True)
    data = write_data(shapes, out / "data", args.train_per_class, args.test_per_class)
    snapshots = [Path(args.model)] if args.model else train_snapshots(shapes, args, out / "models")
    final = snapshots[-1]

    print(f"probes and zero-shot on {len(snapshots)} model(s) ...", flush=True)
    shots = [int(k) for k in args.probe_shots.split(",") if k]
    rows = {p.name: analyse(p, data, shots, progress=not args.quiet) for p in snapshots}
    lines = baseline_lines(rows)
    pts = {}
    for name, accs in rows.items():
        short = name.replace("step_", "").lstrip("0") or name
        for kind, a in accs.items():
            label = f"ZS {short}" if kind == "zero-shot" else f"{kind.replace('probe', 'P')} {short}"
            pts[label] = (a["in"], mean_shift(a))
    plot_robustness(
        pts,
        out / "robustness_snapshots.png",
        lines["mean"],
        ylabel="mean accuracy over shifted sets (%)",
        title="zero-shot (ZS) vs supervised probes (P) over training",
    )

    tasks = write_tasks(out / "tasks.yaml", final, data, lines, args)
    print(f"clipforge eval suite --tasks {tasks}", flush=True)
    from clipforge.cli import main as cli

    rc = cli(["eval", "suite", "--tasks", str(tasks)])
    if rc:
        return rc
    records = json.loads((out / "suite" / "suite.json").read_text())
    curve = next(r for r in records if r["task"] == "few_shot")["metrics"]["curve"]

    fs, snap = fewshot_table(curve), snapshot_table(rows, lines)
    print(f"\nfew-shot on {final.name} (mean ± std over {args.fewshot_seeds} seeds, top-1 %):\n{fs}")
    print(f"robustness over training (top-1 %; baseline line = all probes, mean over shifts):\n{snap}")
    summary = {
        "model": str(final),
        "snapshots": [str(p) for p in snapshots],
        "accuracies": rows,
        "baseline_lines": {k: list(v) for k, v in lines.items()},
        "few_shot": curve,
        "wall_seconds": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(f"# few-shot\n\n{fs}\n# robustness over training\n\n{snap}")
    secs = summary["wall_seconds"]
    print(f"wrote {out}/summary.json, summary.md, suite/, robustness_snapshots.png ({secs:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
