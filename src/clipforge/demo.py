"""The built-in demo: a tiny CLIP trained from scratch on synthetic shapes, tested on unseen combinations.

`run_demo(DemoConfig(minutes=5))` generates the image-caption set (no files needed), trains a BPE
vocabulary on the training captions, trains a ~2M-parameter CLIP (a small ModifiedResNet image tower: it
learns shapes in far fewer steps than a ViT of the same cost), and measures zero-shot top-1 over all
colour-shape classes on images of combinations that appeared in training captions (seen) and of
combinations that never did (unseen: purple things and triangles were seen, never a purple triangle),
plus image<->text retrieval recall on held-out pairs. Writes results.json, metrics.jsonl and plots.

Determinism: the number of steps is a fixed function of `minutes` (an assumed, calibrated step rate),
never of measured time, so the same seed gives the same numbers; a slower machine takes longer and the
demo says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoints import save_pretrained
from .config import VisionConfig, get_config
from .data.memory import TensorPairs
from .data.streams import BatchStream
from .eval import RetrievalEvaluator, ZeroShotEvaluator
from .models import create_model
from .models.hardware import native_bf16_cpu, usable_cores
from .tokenizer import train_bpe
from .train.optim import build_optimizer, cosine_schedule
from .train.runs import RunDir, seed_everything
from .train.step import make_step_fn
from .train.trainer import Trainer
from .transforms import PreprocessConfig, normalise_uint8

# Optimizer steps per second of the default demo model (batch 128, one thread, bf16 autocast) assumed for
# the step budget: steps = (minutes * 60 - OVERHEAD_S) * ASSUMED_STEPS_PER_S. Measured on the 2-core
# reference machine (AMD EPYC, AVX512-BF16) while it was shared with other jobs (load 4-6): ~6 steps/s
# for the bare step, ~3.4 steps/s for a whole run; 3.5 is the conservative figure. OVERHEAD_S covers data
# generation, the BPE vocabulary and the final evaluation.
ASSUMED_STEPS_PER_S = 3.5
OVERHEAD_S = 40.0


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
    train_images: int = 30000
    eval_per_class: int = 20  # zero-shot images per combination (seen / unseen)
    retrieval_pairs: int = 500
    eval_every: int | None = None  # None: 5 evaluations over the run (for the curves); 0: at the end only
    vocab_size: int = 640
    width: int = 128
    layers: int = 4
    text_layers: int = 2
    image_tower: str = "resnet"  # "resnet" (a small ModifiedResNet: learns shapes in fewer steps) | "vit"
    resnet_width: int = 16
    image_size: int = 64
    patch_size: int = 8
    p_single: float = 0.8  # scene mix of the training set: one object / several copies / several objects
    p_count: float = 0.1
    text_rate: float = 0.0  # share of training pairs with a written word (a model that learns to read)
    precision: str = "auto"  # bf16 autocast where the CPU has native bf16 matmuls, else fp32
    embed_dim: int = 128
    progress: bool = True
    threads: int = 0  # 0: the usable cores, at most 4

    def num_steps(self) -> int:
        if self.steps is not None:
            return max(1, self.steps)
        return max(10, int((self.minutes * 60 - OVERHEAD_S) * ASSUMED_STEPS_PER_S))


def resolve_precision(precision: str) -> str:
    """ "auto" -> "bf16" where oneDNN has native bf16 kernels (AVX512-BF16 / AMX), else "fp32" (bf16
    emulated in software would be slower than fp32)."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16_cpu() else "fp32"


def demo_model_config(vocab_size: int, demo: DemoConfig):
    base = get_config("demo-vit")
    w, L = demo.width, demo.layers
    if demo.image_tower == "resnet":
        vision = VisionConfig(
            kind="resnet",
            image_size=demo.image_size,
            width=demo.resnet_width,
            layers=(1, 1, 1, 1),
            heads=max(1, demo.resnet_width * 32 // 64),
        )
    elif demo.image_tower == "vit":
        vision = replace(
            base.vision,
            image_size=demo.image_size,
            width=w,
            layers=L,
            heads=max(1, w // 64),
            patch_size=demo.patch_size,
        )
    else:
        raise ValueError(f"image_tower must be 'resnet' or 'vit', got {demo.image_tower!r}")
    text = replace(base.text, vocab_size=vocab_size, width=w, layers=demo.text_layers, heads=max(1, w // 64))
    return base.replace(embed_dim=demo.embed_dim, vision=vision, text=text)


def run_demo(cfg: DemoConfig = DemoConfig()) -> dict[str, Any]:
    from .data.synthetic import ShapesConfig, classification_set, holdout_combos, make_tensors

    t0 = time.perf_counter()
    # Default: the usable cores, at most 4 (the tiny convs and matmuls gain little beyond). On a quiet
    # 2-core AVX2 machine in fp32, 2 threads trained 1.9x faster than 1 (80 steps: 45 s vs 85 s). On a
    # machine shared with other jobs, OpenMP's spin-waiting made 2 threads several times slower than 1:
    # --threads 1 there (one thread also makes the numbers independent of the core count).
    torch.set_num_threads(cfg.threads or usable_cores())
    precision = resolve_precision(cfg.precision)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = cfg.num_steps()
    say = print if cfg.progress else (lambda *a, **k: None)

    # ---- data: training pairs never show the held-out colour-shape combinations
    shapes = ShapesConfig(
        image_size=cfg.image_size,
        seed=cfg.seed,
        p_single=cfg.p_single,
        p_count=cfg.p_count,
        text_rate=cfg.text_rate,
    )
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

    templates = [
        "a {}",
        "a photo of a {}",
        "there is a {}.",
        "a drawing of a {}",
        "a simple illustration of a {}.",
    ]
    evaluators = {
        "seen": ZeroShotEvaluator(classnames, templates, normalise_uint8(seen_x), seen_y),
        "unseen": ZeroShotEvaluator(classnames, templates, normalise_uint8(unseen_x), unseen_y),
        "retrieval": RetrievalEvaluator(normalise_uint8(ret_x), ret_caps, torch.arange(len(ret_caps))),
    }
    evaluators = {k: (lambda m, ev=ev: ev.run(m, tokenizer)) for k, ev in evaluators.items()}
    say(
        f"model: {n_params / 1e6:.1f}M parameters, BPE vocabulary {tokenizer.vocab_size}; {steps} steps of "
        f"batch {cfg.batch_size} (~{steps / ASSUMED_STEPS_PER_S / 60:.1f} min on the 2-core reference "
        f"machine with bf16; the bar shows this machine's pace), {precision}, "
        f"{torch.get_num_threads()} thread(s)"
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
        precision=precision,
        grad_clip=1.0,
        evaluators=evaluators,
        eval_every=(steps // 5 if steps >= 50 else 0) if cfg.eval_every is None else cfg.eval_every,
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
        "precision": precision,
        "threads": torch.get_num_threads(),
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
        "model_dir": str(out / "model"),
    }
    # The trained model, loadable by `clipforge.load` and every `clipforge eval` command.
    save_pretrained(model, out / "model", tokenizer=tokenizer, preprocess=PreprocessConfig(cfg.image_size))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_accuracy(run_dir.metrics, results, out / "plots" / "zeroshot.png")
    return results


def plot_accuracy(metrics_path: Path, results: dict[str, Any], path: Path) -> Path:
    """Seen / unseen zero-shot top-1 over training steps against chance: the demo's one-glance plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r.get("kind") == "eval"]
    steps = [r["step"] for r in evals]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("seen/acc1", "seen combinations"), ("unseen/acc1", "unseen combinations")):
        ax.plot(steps, [100 * r[key] for r in evals], marker="o", label=label)
    ax.axhline(
        100 * results["chance"], color="gray", ls="--", label=f"chance ({100 * results['chance']:.1f}%)"
    )
    ax.set(xlabel="step", ylabel="zero-shot top-1 (%)", ylim=(0, 100), title="colour-shape zero-shot")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def format_results(r: dict[str, Any]) -> str:
    """A small table of the numbers that matter (what `clipforge demo` prints)."""
    ret = r["retrieval"]

    def recalls(direction: str) -> str:
        return " / ".join(f"{100 * ret[f'{direction}_retrieval_recall@{k}']:.1f}" for k in (1, 5, 10))

    n_unseen = len(r["unseen_combinations"])
    rows = [
        (f"chance (1 of {r['num_classes']} colour-shape classes)", f"{100 * r['chance']:.1f}%"),
        (f"zero-shot top-1, seen combinations ({r['seen_combinations']})", f"{100 * r['seen_top1']:.1f}%"),
        (f"zero-shot top-1, unseen combinations ({n_unseen})", f"{100 * r['unseen_top1']:.1f}%"),
        ("retrieval text->image R@1/5/10 (%)", recalls("image")),
        ("retrieval image->text R@1/5/10 (%)", recalls("text")),
        ("training", f"{r['steps']} steps x batch {r['batch_size']}, {r['params'] / 1e6:.1f}M params"),
        ("final loss", f"{r['final_loss']:.3f}"),
        ("wall time (data + training + eval)", f"{r['wall_seconds']:.0f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{w}}  {v}" for k, v in rows]
    lines.append(f"  unseen: {', '.join(r['unseen_combinations'])}")
    return "\n".join(lines)
