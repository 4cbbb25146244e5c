"""Robustness to distribution shift (CLIP paper, Sec. 3.3, Figs. 13-14; Taori et al. 2020).

Effective robustness: accuracy on a shifted set beyond what in-distribution accuracy predicts. The
prediction is a linear fit of logit(acc_shift) against logit(acc_in) over a set of baseline models
(or checkpoints); a model's effective robustness is acc_shift - sigmoid(a * logit(acc_in) + b).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .features import encode_images
from .zeroshot import zero_shot_classifier, zero_shot_metrics

EPS = 1e-4  # keep logits finite at 0% / 100%


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64).clamp(EPS, 1 - EPS)
    return torch.log(p / (1 - p))


def fit_logit_line(acc_in: Sequence[float], acc_shift: Sequence[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of logit(acc_shift) = slope * logit(acc_in) + intercept."""
    x, y = logit(acc_in), logit(acc_shift)
    if len(x) < 2:
        raise ValueError("the baseline fit needs at least two (in-distribution, shifted) accuracy pairs")
    a = torch.stack([x, torch.ones_like(x)], dim=1)
    slope, intercept = torch.linalg.lstsq(a, y[:, None]).solution[:, 0].tolist()
    return slope, intercept


def predicted_shift_accuracy(acc_in, line: tuple[float, float]) -> torch.Tensor:
    return torch.sigmoid(line[0] * logit(acc_in) + line[1])


def effective_robustness(acc_in, acc_shift, line: tuple[float, float]):
    """acc_shift minus the baseline line's prediction from acc_in (elementwise; floats in, floats out)."""
    er = torch.as_tensor(acc_shift, dtype=torch.float64) - predicted_shift_accuracy(acc_in, line)
    return er.item() if er.dim() == 0 else er.tolist()


def evaluate_shifts(
    model: torch.nn.Module,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    sets: Mapping[str, object],
    labels: Mapping[str, torch.Tensor] | None = None,
    batch_size: int = 256,
    device=None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Zero-shot metrics of one model on every set ({name: images | Dataset | DataLoader}); one classifier."""
    clf = zero_shot_classifier(model, tokenizer, classnames, templates, batch_size, device)
    out = {}
    for name, data in sets.items():
        feats, y = encode_images(model, data, batch_size, device, progress=progress, desc=name)
        y = labels[name] if labels is not None and name in labels else y
        if y is None:
            raise ValueError(f"set {name!r} has no labels")
        out[name] = zero_shot_metrics(feats, torch.as_tensor(y), clf.cpu())
    return out


def robustness_summary(
    results: Mapping[str, Mapping[str, float]], in_distribution: str, line: tuple[float, float] | None = None
) -> dict[str, dict[str, float]]:
    """Per shifted set: accuracy, gap to in-distribution, and effective robustness when a baseline line
    is given ({set: {"acc1", "drop", "effective_robustness"}})."""
    acc_in = results[in_distribution]["acc1"]
    out = {}
    for name, m in results.items():
        if name == in_distribution:
            continue
        row = {"acc1": m["acc1"], "drop": acc_in - m["acc1"]}
        if line is not None:
            row["effective_robustness"] = effective_robustness(acc_in, m["acc1"], line)
        out[name] = row
    return out


def plot_robustness(
    points: Mapping[str, tuple[float, float]],
    path: str | Path,
    line: tuple[float, float] | None = None,
    xlabel: str = "in-distribution accuracy (%)",
    ylabel: str = "shifted-set accuracy (%)",
    title: str = "effective robustness",
) -> Path:
    """Scatter of (acc_in, acc_shift) per model on logit axes, y = x (perfect robustness) and the fit line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    xs = logit([p[0] for p in points.values()])
    ys = logit([p[1] for p in points.values()])
    ax.scatter(xs, ys, zorder=3)
    for (name, _), x, y in zip(points.items(), xs.tolist(), ys.tolist()):
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    lo = min(xs.min(), ys.min()).item() - 0.5
    hi = max(xs.max(), ys.max()).item() + 0.5
    grid = torch.linspace(lo, hi, 50, dtype=torch.float64)
    ax.plot(grid, grid, "k--", lw=1, label="y = x (perfectly robust)")
    if line is not None:
        ax.plot(grid, line[0] * grid + line[1], "r-", lw=1, label="baseline fit")
    ticks = [t for t in (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99) if lo <= logit(t).item() <= hi]
    for setter in (ax.set_xticks, ax.set_yticks):
        setter(logit(ticks).tolist(), [f"{t * 100:g}" for t in ticks])
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
