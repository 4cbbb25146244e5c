"""The built-in demo: a tiny CLIP trained from scratch on synthetic shapes, tested on unseen combinations.

`run_demo(DemoConfig(minutes=5))` generates the image-caption set (no files needed), trains a BPE
vocabulary on the training captions, trains a ~5M-parameter CLIP, and measures zero-shot top-1 over all
colour-shape classes on images of combinations that appeared in training captions (seen) and of
combinations that never did (unseen: purple things and triangles were seen, never a purple triangle),
plus image<->text retrieval recall on held-out pairs. Writes results.json, metrics.jsonl and plots.

Determinism: the number of steps is a fixed function of `minutes` (an assumed, calibrated step rate),
never of measured time, so the same seed gives the same numbers; a slower machine takes longer and the
demo says so.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .config import get_config
from .data.memory import TensorPairs
from .eval import RetrievalEvaluator, ZeroShotEvaluator
from .models import create_model
from .tokenizer import train_bpe
from .train.build import normalise_uint8
from .train.optim import build_optimizer, cosine_schedule
from .train.runs import RunDir, seed_everything
from .train.step import make_step_fn
from .train.trainer import BatchStream, Trainer

# Optimizer steps per second of the demo model at batch 128 on 2 CPU cores (fp32), measured; the step
# count is minutes * 60 * this, minus the time set aside for data generation and evaluation.
ASSUMED_STEPS_PER_S = 1.0
OVERHEAD_S = 25.0


@dataclass(frozen=True)
class DemoConfig:
    minutes: float = 5.0
    seed: int = 0
    out: str = "demo_out"
    steps: int | None = None  # overrides the budget (tests)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    train_images: int = 20000
    eval_per_class: int = 10  # zero-shot images per combination (seen / unseen)
    retrieval_pairs: int = 500
    eval_every: int = 0  # 0 = at the end only
    vocab_size: int = 640
    width: int = 128
    layers: int = 4
    text_layers: int = 2
    patch_size: int = 8
    embed_dim: int = 128
    progress: bool = True
    threads: int | None = None  # default: all cores

    def num_steps(self) -> int:
        if self.steps is not None:
            return max(1, self.steps)
        return max(10, int((self.minutes * 60 - OVERHEAD_S) * ASSUMED_STEPS_PER_S))


def demo_model_config(vocab_size: int, demo: DemoConfig):
    base = get_config("demo-vit")
    w, L = demo.width, demo.layers
    vision = replace(base.vision, width=w, layers=L, heads=max(1, w // 64), patch_size=demo.patch_size)
    text = replace(base.text, vocab_size=vocab_size, width=w, layers=demo.text_layers, heads=max(1, w // 64))
    return base.replace(embed_dim=demo.embed_dim, vision=vision, text=text)


def run_demo(cfg: DemoConfig = DemoConfig()) -> dict[str, Any]:
    from .data.synthetic import ShapesConfig, classification_set, holdout_combos, make_tensors

    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = cfg.num_steps()
    say = print if cfg.progress else (lambda *a, **k: None)

    # ---- data: training pairs never show the held-out colour-shape combinations
    shapes = ShapesConfig(image_size=64, seed=cfg.seed)
    unseen = holdout_combos(shapes)
    say(
        f"generating {cfg.train_images} synthetic training pairs ({len(unseen)} of "
        f"{len(shapes.colours) * len(shapes.shapes)} colour-shape combinations held out) ..."
    )
    train_x, train_caps = make_tensors(shapes, cfg.train_images, "train")
    seen_x, seen_y, classnames = classification_set(shapes, cfg.eval_per_class, "seen_eval", classes="all")
    unseen_x, unseen_y, _ = classification_set(shapes, cfg.eval_per_class, "unseen", classes="all")
    ret_x, ret_caps = make_tensors(shapes, cfg.retrieval_pairs, "seen_eval")
    held = [f"{c} {s}" for c, s in unseen]
    leaked = [c for c in train_caps if any(h in c for h in held)]
    if leaked:  # the whole point of the demo: never true
        raise RuntimeError(f"a held-out combination appears in a training caption: {leaked[0]!r}")

    # ---- tokenizer + model
    tokenizer = train_bpe(train_caps, vocab_size=cfg.vocab_size, context_length=32)
    model = create_model(demo_model_config(tokenizer.vocab_size, cfg))
    n_params = sum(p.numel() for p in model.parameters())
    tokens = tokenizer(train_caps, context_length=model.context_length, truncate=True)
    data = BatchStream(TensorPairs(train_x, tokens), cfg.batch_size, seed=cfg.seed)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (0.9, 0.98), 1e-6)
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, steps)
    step_fn = make_step_fn("clip")

    templates = ["a {}.", "a photo of a {}.", "there is a {}."]
    evaluators = {
        "seen": ZeroShotEvaluator(classnames, templates, normalise_uint8(seen_x), seen_y),
        "unseen": ZeroShotEvaluator(classnames, templates, normalise_uint8(unseen_x), unseen_y),
        "retrieval": RetrievalEvaluator(normalise_uint8(ret_x), ret_caps, torch.arange(len(ret_caps))),
    }
    evaluators = {k: (lambda m, ev=ev: ev.run(m, tokenizer)) for k, ev in evaluators.items()}
    say(
        f"model: {n_params / 1e6:.1f}M parameters, BPE vocabulary {tokenizer.vocab_size}; {steps} steps of "
        f"batch {cfg.batch_size} (~{steps / ASSUMED_STEPS_PER_S / 60:.1f} min on 2 CPU cores)"
    )

    run_dir = RunDir(out)
    if run_dir.metrics.exists():
        run_dir.metrics.unlink()  # a fresh demo each time
    trainer = Trainer(
        model,
        step_fn,
        optimizer,
        scheduler,
        data,
        steps=steps,
        batch_size=cfg.batch_size,
        run_dir=run_dir,
        config={"demo": asdict(cfg)},
        grad_clip=1.0,
        evaluators=evaluators,
        eval_every=cfg.eval_every,
        checkpoint_every=0,
        keep_last=1,
        log_every=10,
        after_step=lambda m: m.clamp_logit_scale(),
        scalars=lambda m: {"logit_scale": m.logit_scale.exp().item()},
        progress=cfg.progress,
    )
    t_train = time.perf_counter()
    result = trainer.fit()
    train_s = time.perf_counter() - t_train
    expected = steps / ASSUMED_STEPS_PER_S
    if cfg.steps is None and train_s > 1.25 * expected:
        say(
            f"warning: training took {train_s:.0f} s, more than the {expected:.0f} s assumed for 2 free "
            "CPU cores (a busy or slower machine); the step count stays fixed (reproducible)"
        )
    ev = result.eval
    results = {
        "seed": cfg.seed,
        "steps": steps,
        "batch_size": cfg.batch_size,
        "params": n_params,
        "num_classes": len(classnames),
        "chance": 1 / len(classnames),
        "seen_top1": ev["seen/acc1"],
        "unseen_top1": ev["unseen/acc1"],
        "seen_combinations": len(classnames) - len(held),
        "unseen_combinations": held,
        "retrieval": {k.split("/", 1)[1]: v for k, v in ev.items() if k.startswith("retrieval/")},
        "final_loss": result.losses[-1],
        "train_seconds": train_s,
        "wall_seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def format_results(r: dict[str, Any]) -> str:
    ret = r["retrieval"]
    lines = [
        f"zero-shot over {r['num_classes']} colour-shape classes (chance {100 * r['chance']:.1f}%):",
        f"  seen combinations   ({r['seen_combinations']}): top-1 {100 * r['seen_top1']:.1f}%",
        f"  unseen combinations ({len(r['unseen_combinations'])}): top-1 {100 * r['unseen_top1']:.1f}%"
        f"   [{', '.join(r['unseen_combinations'])}]",
        "retrieval on held-out pairs (recall@1/5/10):",
        "  text->image  " + " / ".join(f"{100 * ret[f'image_retrieval_recall@{k}']:.1f}" for k in (1, 5, 10)),
        "  image->text  " + " / ".join(f"{100 * ret[f'text_retrieval_recall@{k}']:.1f}" for k in (1, 5, 10)),
        f"{r['steps']} steps, final loss {r['final_loss']:.3f}, wall time {r['wall_seconds']:.0f} s",
    ]
    return "\n".join(lines)
