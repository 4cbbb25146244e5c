"""Few-shot linear probes (CLIP paper, Fig. 6): k labelled examples per class, several seeds.

Two probes per (k, seed):
- "linear_probe": the plain L-BFGS logistic regression of linear_probe.py (W pulled towards 0);
- "zero_shot_prior": initialised from the zero-shot classifier and regularised towards it,
  lambda / 2 * ||W - s * W_zeroshot||^2 (+ lambda / 2 * ||b||^2), with s the logit scale that best fits the
  shots. lambda -> inf IS the zero-shot classifier, and lambda is chosen by cross-validation over the
  shots with that limit among the candidates, so a few examples cannot pull the probe far below
  zero-shot (the paper notes plain few-shot probes need ~4 shots to match zero-shot).
Lambda is chosen by k-fold cross-validation over the shots (a separate validation split is impossible
at k = 1).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .linear_probe import fit_logistic, lambda_grid, predict_logits

DEFAULT_KS = (1, 2, 4, 8, 16)


def sample_k_shot(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Indices of k random examples of every class (all of a class's examples when it has fewer)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels).cpu()
    picks = []
    for c in labels.unique():
        idx = (labels == c).nonzero().view(-1)
        picks.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(picks).sort().values


def fit_scale(x: torch.Tensor, y: torch.Tensor, classifier: torch.Tensor) -> float:
    """The temperature s minimising the shots' cross entropy of s * x @ W_zeroshot (log grid 1..1000)."""
    logits = x.double() @ classifier.to(x.device).double()
    scales = torch.logspace(0, 3, 61, dtype=torch.float64)
    losses = [F.cross_entropy(s * logits, y.to(x.device)).item() for s in scales]
    return float(scales[min(range(len(losses)), key=losses.__getitem__)])


def cv_lambda(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lams: Sequence[float],
    prior: torch.Tensor | None = None,
    folds: int = 5,
    seed: int = 0,
    **fit_kwargs,
) -> tuple[float, dict[float, float]]:
    """Lambda with the best k-fold accuracy (ties -> larger); with a prior, inf (= the prior) competes."""
    n, n_l = len(y), len(lams)
    folds = max(2, min(folds, n))
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[torch.randperm(n, generator=torch.Generator().manual_seed(seed))] = torch.arange(n) % folds
    # one batched fit: block (fold f, lambda l) trains on the samples outside fold f
    train_mask = (fold_of[None, :] != torch.arange(folds)[:, None]).double()  # (F, N)
    weight = train_mask.repeat_interleave(n_l, dim=0)  # (F * L, N)
    w, b = fit_logistic(x, y, num_classes, list(lams) * folds, prior, prior is not None, weight, **fit_kwargs)
    pred = predict_logits(x, w, b).argmax(-1).cpu().view(folds, n_l, n)
    held_out = (1 - train_mask).bool()  # (F, N)
    hit = (pred == y.cpu()[None, None]) & held_out[:, None, :]
    correct = torch.zeros(n_l + 1, dtype=torch.float64)
    correct[:-1] = hit.sum((0, 2)).double()
    if prior is not None:
        correct[-1] = ((x.to(prior) @ prior).argmax(-1).cpu() == y.cpu()).sum().double()
    cands = [*list(lams), math.inf] if prior is not None else list(lams)
    acc = {lam: (correct[i] / n).item() for i, lam in enumerate(cands)}
    return max(acc, key=lambda lam: (acc[lam], lam)), acc


def few_shot_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    classifier: torch.Tensor | None = None,
    lams: Sequence[float] | None = None,
    seed: int = 0,
    **fit_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One probe on the shots (with `classifier` (D, C): the zero-shot-prior probe) -> (W, b, lambda)."""
    y = torch.as_tensor(y).long()
    lams = list(lams) if lams is not None else lambda_grid(1e-4, 1e2, 7)
    prior = None
    if classifier is not None:
        prior = fit_scale(x, y, classifier) * classifier.to(x.device).to(x.dtype)
    fit_kwargs.setdefault("max_iter", 300)  # few samples: near-separable, stop early
    lam, _ = cv_lambda(x, y, num_classes, lams, prior=prior, seed=seed, **fit_kwargs)
    if math.isinf(lam):
        return prior, torch.zeros(num_classes, dtype=prior.dtype, device=prior.device), lam
    w, b = fit_logistic(x, y, num_classes, [lam], prior=prior, penalize_bias=prior is not None, **fit_kwargs)
    return w[0], b[0], lam


def few_shot_curve(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    classifier: torch.Tensor | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    seeds: Sequence[int] = (0, 1, 2),
    lams: Sequence[float] | None = None,
    progress: bool = False,
    **fit_kwargs,
) -> dict:
    """Accuracy vs k: {"k": [...], "linear_probe": {"mean", "std", "runs"}, ["zero_shot_prior": ...,
    "zero_shot": acc], "classes_below_k": [...]}; mean/std over seeds (std with Bessel's correction; 0 for
    one seed). A class with fewer than k training examples uses all it has: how many classes did so at
    each k is in "classes_below_k", and a warning says it (such a point is not a k-shot result)."""
    from tqdm.auto import tqdm

    test_y = torch.as_tensor(test_y).long()
    counts = torch.bincount(torch.as_tensor(train_y).long().cpu(), minlength=num_classes)
    below = [int((counts < k).sum()) for k in ks]
    short = [(k, n) for k, n in zip(ks, below) if n]
    if short:
        warnings.warn(
            f"few-shot: {', '.join(f'k={k}: {n} of {num_classes} classes' for k, n in short)} have fewer "
            f"training examples than k (fewest: {int(counts.min())}) and use all they have",
            stacklevel=2,
        )
    kinds = ["linear_probe"] + (["zero_shot_prior"] if classifier is not None else [])
    runs = {kind: [[] for _ in ks] for kind in kinds}
    jobs = [(i, k, s) for i, k in enumerate(ks) for s in seeds]
    for i, k, s in tqdm(jobs, desc="few-shot", disable=not progress, leave=False):
        idx = sample_k_shot(train_y, k, s)
        x, y = train_x[idx], torch.as_tensor(train_y)[idx].long()
        for kind in kinds:
            w, b, _ = few_shot_probe(
                x, y, num_classes, classifier if kind == "zero_shot_prior" else None, lams, s, **fit_kwargs
            )
            pred = predict_logits(test_x, w, b).argmax(-1).cpu()
            runs[kind][i].append((pred == test_y).double().mean().item())
    out: dict = {"k": list(ks), "classes_below_k": below}
    for kind in kinds:
        t = [torch.tensor(r, dtype=torch.float64) for r in runs[kind]]
        out[kind] = {
            "mean": [r.mean().item() for r in t],
            "std": [r.std().item() if len(r) > 1 else 0.0 for r in t],
            "runs": runs[kind],
        }
    if classifier is not None:
        zs = (test_x.to(classifier) @ classifier).argmax(-1).cpu()
        out["zero_shot"] = (zs == test_y).double().mean().item()
    return out


def plot_few_shot(curve: dict, path: str | Path, title: str = "few-shot linear probes") -> Path:
    """Accuracy vs k (log2 axis, mean +- std bands), zero-shot accuracy as a horizontal line; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    labels = {"linear_probe": "linear probe", "zero_shot_prior": "probe with zero-shot prior"}
    for kind, label in labels.items():
        if kind in curve:
            m = torch.tensor(curve[kind]["mean"]) * 100
            sd = torch.tensor(curve[kind]["std"]) * 100
            ax.plot(curve["k"], m, marker="o", label=label)
            ax.fill_between(curve["k"], m - sd, m + sd, alpha=0.2)
    if "zero_shot" in curve:
        ax.axhline(curve["zero_shot"] * 100, color="k", ls="--", label="zero-shot")
    ax.set_xscale("log", base=2)
    ax.set_xticks(curve["k"], [str(k) for k in curve["k"]])
    ax.set_xlabel("labelled examples per class")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
