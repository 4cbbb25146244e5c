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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .config import get_config
from .models import create_model
from .train.runs import RunDir, seed_everything
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
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    train_images: int = 20000
    eval_images: int = 600  # per split (seen / unseen)
    retrieval_pairs: int = 500
    eval_every: int = 0  # 0 = at the end only
    vocab_size: int = 512
    progress: bool = True

    def num_steps(self) -> int:
        if self.steps is not None:
            return max(1, self.steps)
        return max(10, int((self.minutes * 60 - OVERHEAD_S) * ASSUMED_STEPS_PER_S))


class _PairTensors(Dataset):
    """In-memory uint8 images (N, 3, S, S) + token ids (N, T) -> {"image": normalised float, "text": ids}."""

    def __init__(self, images: torch.Tensor, tokens: torch.Tensor) -> None:
        from .transforms import OPENAI_MEAN, OPENAI_STD

        self.images, self.tokens = images, tokens
        self.mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
        self.std = torch.tensor(OPENAI_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": (self.images[i].float() / 255 - self.mean) / self.std, "text": self.tokens[i]}


def _normalise(images: torch.Tensor) -> torch.Tensor:
    from .transforms import OPENAI_MEAN, OPENAI_STD

    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def demo_model_config(vocab_size: int):
    cfg = get_config("demo-vit")
    return cfg.replace(text=type(cfg.text)(**{**asdict(cfg.text), "vocab_size": vocab_size}))


def run_demo(cfg: DemoConfig = DemoConfig()) -> dict[str, Any]:
    from .train import _standin as S

    t0 = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = cfg.num_steps()
    say = print if cfg.progress else (lambda *a, **k: None)

    # ---- data: training pairs never show the held-out colour-shape combinations
    unseen = S.held_out_combos()
    all_combos = sorted((c, s) for c in S.COLOURS for s in S.SHAPES)
    seen = [c for c in all_combos if c not in unseen]
    say(f"generating {cfg.train_images} training images of {len(seen)} colour-shape combinations "
        f"({len(unseen)} combinations held out) ...")  # fmt: skip
    train_x, train_caps, _, _ = S.make_split(cfg.train_images, cfg.seed * 7 + 1, seen)
    classnames = [f"{c} {s}" for c, s in all_combos]
    seen_x, _, seen_y, _ = S.make_split(cfg.eval_images, cfg.seed * 7 + 2, seen, captions=False)
    seen_y = torch.tensor([all_combos.index(seen[i]) for i in seen_y])
    unseen_list = sorted(unseen)
    unseen_x, _, unseen_y, _ = S.make_split(cfg.eval_images, cfg.seed * 7 + 3, unseen_list, captions=False)
    unseen_y = torch.tensor([all_combos.index(unseen_list[i]) for i in unseen_y])
    ret_x, ret_caps, _, _ = S.make_split(cfg.retrieval_pairs, cfg.seed * 7 + 4, seen)
    for caption in train_caps:
        assert not any(f"{c} {s}" in caption for c, s in unseen), caption

    # ---- tokenizer + model
    tokenizer = S.train_bpe(train_caps, vocab_size=cfg.vocab_size, context_length=32)
    model = create_model(demo_model_config(tokenizer.vocab_size))
    n_params = sum(p.numel() for p in model.parameters())
    tokens = tokenizer(train_caps, context_length=model.context_length, truncate=True)
    data = BatchStream(_PairTensors(train_x, tokens), cfg.batch_size, seed=cfg.seed)

    optimizer = S.build_optimizer(model, cfg.lr, cfg.weight_decay, (0.9, 0.98), 1e-6)
    scheduler = S.cosine_schedule(optimizer, cfg.warmup_steps, steps)

    def step_fn(model, batch, *, step, backward):
        img = torch.nn.functional.normalize(model.encode_image(batch["image"]), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(batch["text"]), dim=-1)
        scale = model.logit_scale.exp().clamp(max=model.config.max_logit_scale)
        loss = S.clip_loss(img, txt, scale)
        backward(loss)
        return loss.detach()

    from .eval import RetrievalEvaluator, ZeroShotEvaluator

    templates = ["a {}.", "a picture of a {}.", "a drawing of a {}."]
    evaluators = {
        "seen": ZeroShotEvaluator(classnames, templates, _normalise(seen_x), seen_y).run,
        "unseen": ZeroShotEvaluator(classnames, templates, _normalise(unseen_x), unseen_y).run,
        "retrieval": RetrievalEvaluator(_normalise(ret_x), ret_caps, torch.arange(len(ret_caps))).run,
    }
    evaluators = {k: (lambda m, f=f: f(m, tokenizer)) for k, f in evaluators.items()}
    say(f"model: demo-vit, {n_params / 1e6:.1f}M parameters, vocabulary {tokenizer.vocab_size}; "
        f"{steps} steps of batch {cfg.batch_size} (~{steps / ASSUMED_STEPS_PER_S / 60:.1f} min on 2 CPU cores)")  # fmt: skip

    run_dir = RunDir(out)
    if run_dir.metrics.exists():
        run_dir.metrics.unlink()  # a fresh demo each time
    trainer = Trainer(
        model, step_fn, optimizer, scheduler, data, steps=steps, batch_size=cfg.batch_size, run_dir=run_dir,
        config={"demo": asdict(cfg)}, grad_clip=1.0, evaluators=evaluators, eval_every=cfg.eval_every,
        checkpoint_every=0, keep_last=1, log_every=10, after_step=lambda m: m.clamp_logit_scale(),
        scalars=lambda m: {"logit_scale": m.logit_scale.exp().item()}, progress=cfg.progress,
    )  # fmt: skip
    t_train = time.perf_counter()
    result = trainer.fit()
    train_s = time.perf_counter() - t_train
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
        "seen_combinations": len(seen),
        "unseen_combinations": sorted(f"{c} {s}" for c, s in unseen),
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
