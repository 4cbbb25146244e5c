"""What prompts buy (CLIP paper, sec. 3.1.4): the bare class name, one template, each template, the ensemble.

The paper: "A photo of a {label}." alone improved ImageNet zero-shot by 1.3% over the bare label, and
averaging 80 templates in embedding space added ~3.5% more. `prompt_study` measures the same on any
model and labelled set: every prompt's text features are computed once (class x prompt), and each
variant is a classifier averaged from a subset of them (normalise each, average, renormalise, as
`zero_shot_classifier`). "Which templates help" is answered twice: a template's own accuracy against the
bare name, and its leave-one-out effect on the ensemble (ensemble accuracy minus the ensemble's without it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .features import encode_texts
from .templates import format_template
from .zeroshot import classification_metrics

BARE = "{c}"
SINGLE = "a photo of a {c}."


def _classifier(feats: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
    """(D, C) class weights from the unit-norm text features (C, P, D) of the prompts `idx`."""
    return F.normalize(feats[:, list(idx)].mean(dim=1), dim=-1).T


def prompt_study(
    model: torch.nn.Module,
    tokenizer,
    image_features: torch.Tensor,
    labels: torch.Tensor,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> dict:
    """Accuracy of the bare name, the single template, each template and the ensemble of `templates`.

    image_features (N, D) (normalised or not), labels (N,). Returns {"acc1_bare", "acc1_single",
    "acc1_ensemble", "acc1_best_template", "gain_acc1_single_vs_bare", "gain_acc1_ensemble_vs_single",
    "gain_acc1_ensemble_vs_bare", "templates": [{"template", "acc1", "vs_bare", "ensemble_without",
    "loo_gain"}, ...]} with accuracies as fractions.
    """
    templates = list(dict.fromkeys(templates))  # order kept, duplicates dropped
    if not templates:
        raise ValueError("prompt study: no templates")
    prompts = [BARE, SINGLE] + [t for t in templates if t not in (BARE, SINGLE)]
    pos = {p: i for i, p in enumerate(prompts)}
    texts = [format_template(p, c) for c in classnames for p in prompts]  # class-major
    feats = encode_texts(model, tokenizer, texts, batch_size, device, normalize=True)
    feats = feats.view(len(classnames), len(prompts), -1)  # (C, P, D)
    x = F.normalize(image_features.float(), dim=-1)
    labels = torch.as_tensor(labels).long()

    def acc(idx: Sequence[int]) -> float:
        return classification_metrics(x @ _classifier(feats, idx), labels)["acc1"]

    bare, single = acc([pos[BARE]]), acc([pos[SINGLE]])
    all_idx = [pos[t] for t in templates]
    ensemble = acc(all_idx)
    rows = []
    for t in templates:
        a = acc([pos[t]])
        rest = [i for i in all_idx if i != pos[t]]
        without = acc(rest) if rest else float("nan")
        rows.append(
            {
                "template": t,
                "acc1": a,
                "vs_bare": a - bare,
                "ensemble_without": without,
                "loo_gain": ensemble - without,
            }
        )
    return {
        "acc1_bare": bare,
        "acc1_single": single,
        "acc1_ensemble": ensemble,
        "acc1_best_template": max(r["acc1"] for r in rows),
        "gain_acc1_single_vs_bare": single - bare,
        "gain_acc1_ensemble_vs_single": ensemble - single,
        "gain_acc1_ensemble_vs_bare": ensemble - bare,
        "num_templates": len(templates),
        "templates": rows,
    }


def prompt_table(study: dict) -> str:
    """Markdown: the headline variants, then every template (own accuracy, against the bare name, and what
    leaving it out of the ensemble costs), best first."""
    lines = [
        "| prompt | top-1 (%) | vs bare name (pts) |",
        "|---|---|---|",
        f"| bare class name `{{c}}` | {100 * study['acc1_bare']:.2f} | 0.00 |",
        f"| single template `{SINGLE}` | {100 * study['acc1_single']:.2f} | "
        f"{100 * study['gain_acc1_single_vs_bare']:+.2f} |",
        f"| ensemble of {study['num_templates']} templates | {100 * study['acc1_ensemble']:.2f} | "
        f"{100 * study['gain_acc1_ensemble_vs_bare']:+.2f} |",
        "",
        "| template | top-1 (%) | vs bare name (pts) | ensemble without it (%) | helps the ensemble (pts) |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(study["templates"], key=lambda r: -r["acc1"]):
        lines.append(
            f"| `{r['template']}` | {100 * r['acc1']:.2f} | {100 * r['vs_bare']:+.2f} | "
            f"{100 * r['ensemble_without']:.2f} | {100 * r['loo_gain']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot_prompts(study: dict, path: str | Path, title: str = "") -> Path:
    """Horizontal bars: bare name, single template, each template (sorted) and the ensemble."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(study["templates"], key=lambda r: r["acc1"])
    names = ["bare name {c}", f"single: {SINGLE}"] + [r["template"] for r in rows] + ["ensemble"]
    accs = [study["acc1_bare"], study["acc1_single"]] + [r["acc1"] for r in rows] + [study["acc1_ensemble"]]
    colours = ["gray", "tab:orange"] + ["tab:blue"] * len(rows) + ["tab:green"]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.3 * len(names)))
    ax.barh(range(len(names)), [100 * a for a in accs], color=colours)
    ax.axvline(100 * study["acc1_bare"], color="gray", ls="--", lw=1)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("zero-shot top-1 (%)")
    ax.set_title(title or "prompt engineering and ensembling")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
