"""Linear probe (CLIP paper, Sec. 3.2 / App. A.3): L-BFGS multinomial logistic regression on frozen features.

Objective per regularisation strength lambda (mean cross entropy, so lambda does not depend on n):

    mean_i CE(x_i W + b, y_i) + lambda / 2 * ||W - W_prior||^2        (W_prior = 0 for a plain probe)

which is scikit-learn's `LogisticRegression(C=1 / (lambda * n))` (sklearn minimises
C * sum_i CE_i + ||W||^2 / 2; divide by C * n). The sweep over lambda is one batched problem: L
independent weight blocks (L, D, C) whose summed objective is separable, so one L-BFGS run finds every
block's minimiser at once (on the GPU when the features live there).
The paper sweeps lambda in [1e-6, 1e6] by a parametric binary search on a validation split carved from
train; we do a coarse log grid over that range, then a fine grid around the best, and refit on train+val.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .zeroshot import classification_metrics


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cuda" else torch.float64


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lams: Sequence[float] | torch.Tensor,
    prior: torch.Tensor | None = None,
    penalize_bias: bool = False,
    sample_weight: torch.Tensor | None = None,
    max_iter: int = 1000,
    tol: float = 1e-7,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one multinomial logistic regression per lambda, all at once. Returns W (L, D, C), b (L, C).

    `prior` (D, C): initialise W there and penalise the distance to it instead of to zero.
    `sample_weight` (L, N): per-block weights of the samples in the mean CE (0 drops a sample from a
    block: k-fold cross-validation as one batched problem).
    """
    x, y = torch.as_tensor(x), torch.as_tensor(y)  # (numpy arrays: their `.device` is the string "cpu")
    device = torch.device(device) if device is not None else x.device
    dtype = dtype or default_dtype(device)
    x = x.to(device, dtype)
    y = torch.as_tensor(y).to(device).long()
    lam = torch.as_tensor(lams, dtype=dtype, device=device).reshape(-1)  # (L,)
    n_l, (n, d) = len(lam), x.shape
    if n == 0:
        raise ValueError("fit_logistic: no training samples")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels outside [0, {num_classes})")
    if sample_weight is None:
        sw = torch.full((n_l, n), 1.0 / n, dtype=dtype, device=device)
    else:
        sw = sample_weight.to(device, dtype).expand(n_l, n)
        sw = sw / sw.sum(1, keepdim=True)
    p = torch.zeros(d, num_classes, dtype=dtype, device=device) if prior is None else prior.to(device, dtype)
    # Diagonal preconditioning per block: optimise V = W * s with s = sqrt(lambda + h), h ~ the largest
    # curvature of the data term (0.5 * top eigenvalue of X^T diag(sw) X). Every block's Hessian in V then has
    # eigenvalues <= ~1, so blocks with lambda = 1e-6 and lambda = 1e6 share one L-BFGS run well.
    h = 0.5 * torch.linalg.matrix_norm(x, ord=2) ** 2 * sw.max(1).values[:, None, None]
    s = (lam[:, None, None] + h).sqrt()  # (L, 1, 1)
    v = (p * s).contiguous().requires_grad_(True)  # (L, D, C)
    b = torch.zeros(n_l, num_classes, dtype=dtype, device=device, requires_grad=True)
    xs = x.expand(n_l, n, d)
    yy = y.repeat(n_l)
    opt = torch.optim.LBFGS(
        [v, b],
        lr=1,
        max_iter=max_iter,
        max_eval=int(max_iter * 1.25),
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        w = v / s
        logits = torch.baddbmm(b[:, None, :], xs, w)  # (L, N, C)
        ce = F.cross_entropy(logits.reshape(n_l * n, num_classes), yy, reduction="none").view(n_l, n)
        reg = ((w - p) ** 2).sum((1, 2))
        if penalize_bias:
            reg = reg + (b**2).sum(1)
        loss = ((ce * sw).sum(1) + lam / 2 * reg).sum()  # separable: each block has its own minimiser
        loss.backward()
        return loss

    opt.step(closure)
    return (v / s).detach(), b.detach()


def predict_logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, C) logits for one fit (w (D, C), b (C,)) or (L, N, C) for a batch of fits."""
    x = x.to(w.device, w.dtype)
    return x @ w + b if w.dim() == 2 else torch.baddbmm(b[:, None, :], x.expand(len(w), *x.shape), w)


def stratified_split(
    y: torch.Tensor, val_fraction: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): about val_fraction of every class (at least one when it has >= 2 samples)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(y).cpu()
    tr, va = [], []
    for c in y.unique():
        idx = (y == c).nonzero().view(-1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(len(idx) - 1, max(1, round(len(idx) * val_fraction))) if len(idx) > 1 else 0
        va.append(idx[:k])
        tr.append(idx[k:])
    return torch.cat(tr).sort().values, torch.cat(va).sort().values


def lambda_grid(lo: float = 1e-6, hi: float = 1e6, num: int = 13) -> list[float]:
    return [float(v) for v in torch.logspace(math.log10(lo), math.log10(hi), num, dtype=torch.float64)]


def _accuracies(x, y, w, b) -> torch.Tensor:
    pred = predict_logits(x, w, b).argmax(-1)  # (L, N)
    return (pred == y.to(pred.device)[None]).double().mean(1).cpu()


@dataclass
class LinearProbeResult:
    weight: torch.Tensor  # (D, C)
    bias: torch.Tensor  # (C,)
    lam: float  # chosen regularisation strength (mean-CE convention; sklearn C = 1 / (lam * n))
    val_accuracy: dict[float, float] = field(default_factory=dict)  # the sweep
    metrics: dict[str, float] = field(default_factory=dict)  # on the test set, when given

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return predict_logits(x, self.weight, self.bias)


def sweep_lambda(
    x_train, y_train, x_val, y_val, num_classes, lams, sweep_batch: int = 16, **fit_kwargs
) -> dict[float, float]:
    """Validation accuracy of every lambda, fitted in batches of `sweep_batch` blocks."""
    out = {}
    lams = list(lams)
    for i in range(0, len(lams), sweep_batch):
        chunk = lams[i : i + sweep_batch]
        w, b = fit_logistic(x_train, y_train, num_classes, chunk, **fit_kwargs)
        out.update(zip(chunk, _accuracies(x_val, y_val, w, b).tolist()))
    return out


def choose_lambda(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    val_fraction: float = 0.2,
    seed: int = 0,
    lams: Sequence[float] | None = None,
    refine: int = 8,
    **fit_kwargs,
) -> tuple[float, dict[float, float]]:
    """Best lambda on a stratified validation split of (x, y): coarse log grid, then a finer one around it.

    Ties go to the larger lambda (the simpler model)."""
    tr, va = stratified_split(y, val_fraction, seed)
    if len(va) == 0:
        raise ValueError("too few samples per class to carve a validation split; pass a fixed lambda")
    y = torch.as_tensor(y)
    args = (x[tr], y[tr], x[va], y[va], num_classes)
    grid = list(lams) if lams is not None else lambda_grid()
    acc = sweep_lambda(*args, grid, **fit_kwargs)
    if refine and len(grid) > 1:
        best = max(acc, key=lambda lam: (acc[lam], lam))
        i = sorted(acc).index(best)
        srt = sorted(acc)
        lo, hi = srt[max(i - 1, 0)], srt[min(i + 1, len(srt) - 1)]
        fine = [v for v in lambda_grid(lo, hi, refine + 2)[1:-1] if v not in acc]
        acc.update(sweep_lambda(*args, fine, **fit_kwargs))
    best = max(acc, key=lambda lam: (acc[lam], lam))
    return best, dict(sorted(acc.items()))


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    num_classes: int | None = None,
    lam: float | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    lams: Sequence[float] | None = None,
    refine: int = 8,
    **fit_kwargs,
) -> LinearProbeResult:
    """The paper's protocol: sweep lambda on a validation split of train, refit on all of train, test.

    A fixed `lam` skips the sweep. Features and labels: tensors, numpy arrays or lists."""
    train_features = torch.as_tensor(train_features)
    if test_features is not None:
        test_features = torch.as_tensor(test_features)
    y = torch.as_tensor(train_labels).long()
    c = (
        num_classes
        or int(max(y.max(), -1 if test_labels is None else torch.as_tensor(test_labels).max())) + 1
    )
    sweep: dict[float, float] = {}
    if lam is None:
        lam, sweep = choose_lambda(train_features, y, c, val_fraction, seed, lams, refine, **fit_kwargs)
    w, b = fit_logistic(train_features, y, c, [lam], **fit_kwargs)
    res = LinearProbeResult(w[0], b[0], float(lam), sweep)
    if test_features is not None:
        logits = res.logits(test_features)
        res.metrics = classification_metrics(logits, torch.as_tensor(test_labels).to(logits.device))
    return res
