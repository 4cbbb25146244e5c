"""Results in CLIP_benchmark's JSON shape, a Markdown table over many results, a confusion-matrix plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch


def result_record(
    dataset: str, model: str, task: str, metrics: dict, pretrained: str = "", language: str = "en"
) -> dict:
    """{"dataset", "model", "pretrained", "task", "metrics", "language"} as CLIP_benchmark writes it."""
    return {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": task,
        "metrics": metrics,
        "language": language,
    }


def write_json(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    return path


def _scalar_metrics(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def markdown_table(records: Sequence[dict], digits: int = 2) -> str:
    """One row per result, one column per scalar metric: accuracies and recalls in % (as the paper
    reports them), anything else (a regularisation strength, a count) as it is."""
    cols: list[str] = []
    for r in records:
        cols += [k for k in _scalar_metrics(r["metrics"]) if k not in cols]
    head = ["model", "pretrained", "dataset", "task", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        m = _scalar_metrics(r["metrics"])
        vals = [_format_metric(c, m[c], digits) if c in m else "" for c in cols]
        lines.append(
            "| " + " | ".join([r["model"], r.get("pretrained", ""), r["dataset"], r["task"], *vals]) + " |"
        )
    return "\n".join(lines) + "\n"


def _format_metric(name: str, value: float, digits: int) -> str:
    if any(word in name for word in ("acc", "recall", "robustness", "follow_word", "flipped", "chance")):
        return f"{value * 100:.{digits}f}"
    return f"{value:.4g}"


def per_class_table(classnames: Sequence[str], recall: torch.Tensor) -> str:
    lines = ["| class | recall |", "|---|---|"]
    lines += [f"| {c} | {r * 100:.2f} |" for c, r in zip(classnames, recall.tolist())]
    return "\n".join(lines) + "\n"


def plot_confusion(
    cm: torch.Tensor, classnames: Sequence[str], path: str | Path, normalize: bool = True
) -> Path:
    """Confusion matrix (rows: true class, columns: predicted), row-normalised by default; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = cm.double()
    if normalize:
        m = m / m.sum(1, keepdim=True).clamp(min=1)
    n = len(classnames)
    size = min(4 + 0.25 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    im = ax.imshow(m.numpy(), cmap="Blues")
    if n <= 50:
        ax.set_xticks(range(n), classnames, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classnames, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
