"""Figure 2 of the CLIP paper, runnable: which objective learns zero-shot classification fastest per image.

The paper trained three objectives with the same ResNet-50 image encoder and measured zero-shot ImageNet
top-1 against images processed: a Transformer language model predicting the caption (slowest), a
bag-of-words predictor 3x more efficient, and a bag-of-words contrastive model (CLIP) another 4x more
efficient. `run_study` repeats that on the synthetic shapes: for every objective and seed the same image
tower, batch, learning-rate schedule, training images (same order per seed) and number of images
processed; zero-shot top-1 over all colour-shape classes on images of the held-out combinations at
regular intervals. The contrastive model's text tower is a bag of words by default, as in the figure
(`contrastive_text="transformer"` uses CLIP's Transformer instead); the captioner's decoder has the
Transformer text tower's width and depth.

Outputs: results.json (every curve), results.md (final accuracies and the images-to-accuracy ratios next
to the paper's 3x and 4x) and figure2.png (top-1 against images processed, mean and spread over seeds).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import CLIPConfig, TextConfig, VisionConfig
from ..data.synthetic import ShapesConfig, classification_set, make_tensors
from ..eval.predictive import ObjectiveZeroShotEvaluator
from ..models import CLIP
from ..models.predictive import BagOfWordsText, BoWPredictor, Captioner
from ..tokenizer import train_bpe
from ..transforms import normalise_uint8
from .optim import build_optimizer, cosine_schedule
from .step import contrastive_step

OBJECTIVES = ("captioning", "bow", "contrastive")
PAPER_RATIOS = {"captioning/bow": 3.0, "bow/contrastive": 4.0}
TEMPLATES = ("a {}", "a photo of a {}")


@dataclass(frozen=True)
class StudyConfig:
    images: int = 32768  # images processed per run (steps x batch)
    batch_size: int = 128
    evals: int = 8  # evaluations per run, evenly spaced in images processed
    seeds: tuple[int, ...] = (0, 1, 2)
    objectives: tuple[str, ...] = OBJECTIVES
    contrastive_text: str = "bow"  # "bow" (Figure 2) or "transformer"
    train_images: int = 20000
    eval_per_class: int = 5  # held-out images per combination
    seen_per_class: int = 2  # images per seen combination (0: held-out only)
    image_size: int = 32
    resnet_width: int = 16
    width: int = 128  # text width (decoder, text towers) and joint embedding
    text_layers: int = 2
    vocab_size: int = 640  # BPE vocabulary trained on the captions (>= 514)
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    bf16: bool = False
    data_seed: int = 0  # the synthetic set (and its held-out combinations) is the same for every run
    threads: int | None = 1  # torch CPU threads (None: leave as is); 1 keeps tiny models fast on shared CPUs

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(self.seeds))
        object.__setattr__(self, "objectives", tuple(self.objectives))
        unknown = set(self.objectives) - set(OBJECTIVES)
        if unknown:
            raise ValueError(f"unknown objectives {sorted(unknown)}; choose from {OBJECTIVES}")
        if self.contrastive_text not in ("bow", "transformer"):
            raise ValueError(
                f"contrastive_text must be 'bow' or 'transformer', got {self.contrastive_text!r}"
            )
        for name in ("batch_size", "evals", "train_images", "eval_per_class"):
            if getattr(self, name) < 1:  # each divides something or sizes a set
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        ShapesConfig(image_size=self.image_size)  # its own checks (image_size >= 16), before any work
        if self.images < self.batch_size:
            raise ValueError(f"images ({self.images}) must be at least one batch ({self.batch_size})")

    @property
    def steps(self) -> int:
        return self.images // self.batch_size


def _configs(cfg: StudyConfig, vocab_size: int) -> tuple[VisionConfig, TextConfig]:
    vision = VisionConfig(
        kind="resnet", image_size=cfg.image_size, width=cfg.resnet_width, layers=(1, 1, 1, 1), heads=8
    )
    text = TextConfig(
        context_length=32,
        vocab_size=vocab_size,
        width=cfg.width,
        heads=max(1, cfg.width // 64),
        layers=cfg.text_layers,
    )
    return vision, text


def build_model(
    objective: str, vision: VisionConfig, text: TextConfig, embed_dim: int, bow_text: bool
) -> nn.Module:
    """The model an objective trains; every one has the same image tower (config and initialisation)."""
    if objective == "captioning":
        return Captioner(vision, embed_dim, text)
    if objective == "bow":
        return BoWPredictor(vision, embed_dim, text.vocab_size)
    if objective == "contrastive":
        tower = None
        if bow_text:
            tower = BagOfWordsText(text.vocab_size, text.width, embed_dim)
            tower.init_weights()
        return CLIP(CLIPConfig(embed_dim=embed_dim, vision=vision, text=text), text_tower=tower)
    raise ValueError(f"unknown objective {objective!r}; choose from {OBJECTIVES}")


def _step(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, amp) -> float:
    if isinstance(model, CLIP):
        with amp():
            return contrastive_step(model, images, tokens, "clip").loss
    with amp():
        loss = model.loss(images, tokens)
    loss.backward()
    return float(loss.detach())


def train_curve(
    objective: str,
    seed: int,
    cfg: StudyConfig,
    images: torch.Tensor,
    tokens: torch.Tensor,
    evaluate: Callable[[nn.Module], dict[str, float]],
    vision: VisionConfig,
    text: TextConfig,
    say: Callable[[str], None] = print,
) -> dict:
    """Train one objective from scratch; {"images": [...], "acc1": [...], "loss": [...]} at the evals."""
    torch.manual_seed(seed)
    model = build_model(objective, vision, text, cfg.width, cfg.contrastive_text == "bow")
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, (0.9, 0.98), 1e-6)
    sched = cosine_schedule(opt, cfg.warmup_steps, cfg.steps)
    order = torch.randperm(
        len(images), generator=torch.Generator().manual_seed(seed)
    )  # same for every objective
    every = max(1, cfg.steps // cfg.evals)
    curve: dict[str, list] = {"images": [0], "loss": [float("nan")]}
    for k, v in evaluate(model).items():
        curve[k] = [v]

    def amp():
        return torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else nullcontext()

    losses, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        idx = order[(step * cfg.batch_size + torch.arange(cfg.batch_size)) % len(images)]
        model.train()
        losses.append(_step(model, normalise_uint8(images[idx]), tokens[idx], amp))
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if isinstance(model, CLIP):
            model.clamp_logit_scale()
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            if (step + 1) * cfg.batch_size == curve["images"][-1]:
                continue
            curve["images"].append((step + 1) * cfg.batch_size)
            for k, v in evaluate(model).items():
                curve[k].append(v)
            curve["loss"].append(sum(losses[-every:]) / len(losses[-every:]))
            say(
                f"{objective:>11} seed {seed}: {curve['images'][-1]:>7} images, "
                f"loss {curve['loss'][-1]:.3f}, held-out top-1 {100 * curve['acc1'][-1]:.1f}%, seen "
                f"{100 * curve.get('acc1_seen', [float('nan')])[-1]:.1f}% "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    return curve


# ------------------------------------------------------------------------------------------ analysis
def images_to_reach(images: list[int], acc: list[float], target: float) -> float | None:
    """Images processed when the curve first reaches `target` (linear between evaluations), or None."""
    for i, a in enumerate(acc):
        if a >= target:
            if i == 0:
                return float(images[0])
            x0, x1, a0 = images[i - 1], images[i], acc[i - 1]
            return x0 + (x1 - x0) * (target - a0) / (a - a0)
    return None


def _mean_curve(curves: list[dict], key: str = "acc1") -> tuple[list[int], list[float], list[float]]:
    acc = torch.tensor([c[key] for c in curves], dtype=torch.float64)  # (seeds, evals)
    std = acc.std(dim=0) if len(curves) > 1 else torch.zeros(acc.shape[1], dtype=torch.float64)
    return curves[0]["images"], acc.mean(dim=0).tolist(), std.tolist()


def efficiency_table(curves: dict[str, list[dict]], chance: float, key: str = "acc1") -> list[dict]:
    """For accuracy targets between chance and the best objective's final mean accuracy: images each
    objective needs to reach it (mean curve over seeds) and the paper's two ratios."""
    means = {k: _mean_curve(v, key) for k, v in curves.items()}
    best = max(m[1][-1] for m in means.values())
    rows = []
    for frac in (0.25, 0.5, 0.75):
        target = chance + frac * (best - chance)
        need = {k: images_to_reach(m[0], m[1], target) for k, m in means.items()}
        row = {"target_acc1": target, "images": need}
        for pair in PAPER_RATIOS:
            a, b = pair.split("/")
            if a in need and b in need:
                row[pair] = need[a] / need[b] if need[a] and need[b] else None  # None: not reached
                if need[a] is None and need[b]:  # a never got there: the ratio is at least the run's length
                    row[f"{pair}_at_least"] = means[a][0][-1] / need[b]
        rows.append(row)
    return rows


def study_markdown(result: dict) -> str:
    curves, table, chance = result["curves"], result["efficiency"], result["chance"]
    c = result["config"]
    lines = [
        f"{c['images']} images per run (batch {c['batch_size']}), seeds {result['seeds_done']}, "
        f"zero-shot top-1 "
        f"over {result['num_classes']} classes on images of {result['num_heldout']} held-out combinations "
        f"(chance {100 * chance:.1f}%); contrastive text tower: {c['contrastive_text']}.",
        "",
        "| objective | held-out: final top-1 (%) | std over seeds | seen: final top-1 (%) | std over seeds |",
        "|---|---|---|---|---|",
    ]
    seen = all("acc1_seen" in c for cs in curves.values() for c in cs)
    for k, cs in curves.items():
        _, mean, std = _mean_curve(cs)
        _, smean, sstd = _mean_curve(cs, "acc1_seen") if seen else ([], [float("nan")], [float("nan")])
        lines.append(
            f"| {k} | {100 * mean[-1]:.1f} | {100 * std[-1]:.1f} | "
            f"{100 * smean[-1]:.1f} | {100 * sstd[-1]:.1f} |"
        )
    lines += ["", "Images to reach a top-1 on the held-out combinations:"]
    lines += _efficiency_lines(curves, table)
    if seen:
        lines += ["", "Images to reach a top-1 on the seen combinations:"]
        lines += _efficiency_lines(curves, result["efficiency_seen"])
    return "\n".join(lines) + "\n"


def _efficiency_lines(curves: dict, table: list[dict]) -> list[str]:
    pairs = [p for p in PAPER_RATIOS if all(k in curves for k in p.split("/"))]
    lines = [
        "",
        "| target top-1 (%) | "
        + " | ".join(f"images: {k}" for k in curves)
        + " | "
        + " | ".join(f"{p} (paper {PAPER_RATIOS[p]:g}x)" for p in pairs)
        + " |",
        "|---|" + "---|" * (len(curves) + len(pairs)),
    ]
    for r in table:
        imgs = [f"{r['images'][k]:.0f}" if r["images"][k] is not None else "not reached" for k in curves]
        ratios = [
            f"{r[p]:.2f}x" if r.get(p) else f"> {r[p + '_at_least']:.2f}x" if p + "_at_least" in r else "n/a"
            for p in pairs
        ]
        lines.append(f"| {100 * r['target_acc1']:.1f} | " + " | ".join(imgs + ratios) + " |")
    return lines


def plot_study(result: dict, path: str | Path) -> Path:
    """Figure 2's axes: zero-shot top-1 against images processed (mean over seeds, band: +- 1 std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("acc1", "held-out combinations")]
    if all("acc1_seen" in c for cs in result["curves"].values() for c in cs):
        keys.append(("acc1_seen", "seen combinations"))
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.2), squeeze=False)
    labels = {
        "captioning": "Transformer language model (captioning)",
        "bow": "bag-of-words prediction",
        "contrastive": f"contrastive ({result['config']['contrastive_text']} text encoder)",
    }
    for ax, (key, what) in zip(axes[0], keys):
        for k, cs in result["curves"].items():
            x, mean, std = _mean_curve(cs, key)
            m, s = torch.tensor(mean) * 100, torch.tensor(std) * 100
            ax.plot(x, m, marker="o", ms=3, label=labels[k])
            ax.fill_between(x, m - s, m + s, alpha=0.2)
        ax.axhline(100 * result["chance"], color="gray", ls="--", lw=1, label="chance")
        ax.set(xlabel="images processed", ylabel=f"zero-shot top-1 on {what} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def run_study(cfg: StudyConfig, out: str | Path | None = None, say: Callable[[str], None] = print) -> dict:
    """Train every objective for every seed on the same data; write results.json/.md and figure2.png
    into `out` when given."""
    before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # as the demo: tiny convs scale poorly and spin-wait when shared
    try:
        return _run_study(cfg, out, say)
    finally:
        torch.set_num_threads(before)


def _run_study(cfg: StudyConfig, out: str | Path | None, say: Callable[[str], None]) -> dict:
    shapes = ShapesConfig(image_size=cfg.image_size, seed=cfg.data_seed, p_single=0.8, p_count=0.1)
    images, captions = make_tensors(shapes, cfg.train_images, "train")
    tokenizer = train_bpe(captions, vocab_size=cfg.vocab_size, context_length=32)
    vision, text = _configs(cfg, tokenizer.vocab_size)
    tokens = tokenizer(captions, context_length=text.context_length, truncate=True)
    x, y, classnames = classification_set(shapes, cfg.eval_per_class, "unseen", classes="all")
    evaluators = {
        "acc1": ObjectiveZeroShotEvaluator(classnames, TEMPLATES, normalise_uint8(x), y, text.context_length)
    }
    if cfg.seen_per_class:
        xs, ys, _ = classification_set(shapes, cfg.seen_per_class, "seen_eval", classes="all")
        evaluators["acc1_seen"] = ObjectiveZeroShotEvaluator(
            classnames, TEMPLATES, normalise_uint8(xs), ys, text.context_length
        )

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {k: ev.run(model, tokenizer)["acc1"] for k, ev in evaluators.items()}

    curves: dict[str, list[dict]] = {k: [] for k in cfg.objectives}
    chance, t0 = 1 / len(classnames), time.perf_counter()
    result: dict = {}
    for seed in cfg.seeds:
        for objective in cfg.objectives:
            curves[objective].append(
                train_curve(objective, seed, cfg, images, tokens, evaluate, vision, text, say)
            )
        result = {
            "config": asdict(cfg),
            "seeds_done": list(cfg.seeds[: len(curves[cfg.objectives[0]])]),
            "num_classes": len(classnames),
            "num_heldout": len(set(y.tolist())),
            "chance": chance,
            "curves": curves,
            "efficiency": efficiency_table(curves, chance),
            "efficiency_seen": efficiency_table(curves, chance, "acc1_seen") if cfg.seen_per_class else [],
            "paper_ratios": PAPER_RATIOS,
            "seconds": time.perf_counter() - t0,
        }
        if out is not None:  # after every seed: a long study cut short still leaves complete comparisons
            write_study(result, out)
    return result


def rewrite_study(out: str | Path) -> dict:
    """Recompute the tables and the figure of a written study from its results.json."""
    result = json.loads((Path(out) / "results.json").read_text())
    result["efficiency"] = efficiency_table(result["curves"], result["chance"])
    if all("acc1_seen" in c for cs in result["curves"].values() for c in cs):
        result["efficiency_seen"] = efficiency_table(result["curves"], result["chance"], "acc1_seen")
    write_study(result, out)
    return result


def write_study(result: dict, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    (out / "results.md").write_text(study_markdown(result))
    plot_study(result, out / "figure2.png")


def _json_default(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    return str(v)
