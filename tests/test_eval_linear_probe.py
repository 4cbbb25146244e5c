import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from clipforge.eval.fewshot import few_shot_curve, plot_few_shot, sample_k_shot
from clipforge.eval.linear_probe import fit_logistic, lambda_grid, linear_probe, stratified_split


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0), torch.tensor(y)
    tr, te = stratified_split(y, 0.3, seed=0)
    return x[tr], y[tr], x[te], y[te]


@pytest.mark.parametrize("lam", [1e-3, 1e-1])
def test_agrees_with_sklearn(digits, lam):
    xtr, ytr, xte, yte = digits
    w, b = fit_logistic(xtr, ytr, 10, [lam])
    # sklearn minimises C * sum CE + ||W||^2 / 2; ours mean CE + lam / 2 ||W||^2  =>  C = 1 / (lam * n)
    sk = LogisticRegression(C=1 / (lam * len(ytr)), tol=1e-8, max_iter=3000).fit(xtr.numpy(), ytr.numpy())
    ours = (xte @ w[0] + b[0]).argmax(1).numpy()
    theirs = sk.predict(xte.numpy())
    assert (ours == theirs).mean() >= 0.99
    acc_o, acc_s = (ours == yte.numpy()).mean(), (theirs == yte.numpy()).mean()
    assert abs(acc_o - acc_s) <= 0.005
    np.testing.assert_allclose(w[0].numpy(), sk.coef_.T, atol=2e-3)


def test_batched_sweep_equals_separate_fits(digits):
    xtr, ytr, _, _ = digits
    lams = [1e-3, 1e-1, 1e2]  # very different conditioning in one batched run
    wb, bb = fit_logistic(xtr[:400], ytr[:400], 10, lams)
    for i, lam in enumerate(lams):
        w, b = fit_logistic(xtr[:400], ytr[:400], 10, [lam])
        torch.testing.assert_close(wb[i], w[0], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(bb[i], b[0], atol=1e-3, rtol=1e-3)


def test_protocol_on_digits(digits):
    """Sweep on a validation split, refit on train+val: raw-pixel probe on digits gets ~95%+."""
    xtr, ytr, xte, yte = digits
    res = linear_probe(xtr, ytr, xte, yte, lams=lambda_grid(1e-5, 1e1, 7), refine=2)
    assert res.metrics["acc1"] >= 0.94
    assert res.lam in res.val_accuracy and res.val_accuracy[res.lam] == max(res.val_accuracy.values())
    sk = LogisticRegression(C=1 / (res.lam * len(ytr)), tol=1e-8, max_iter=3000).fit(xtr.numpy(), ytr.numpy())
    assert abs(sk.score(xte.numpy(), yte.numpy()) - res.metrics["acc1"]) <= 0.005


def test_few_shot_sampling_and_prior_probe(tmp_path):
    g = torch.Generator().manual_seed(0)
    c, d = 6, 16
    means = F.normalize(torch.randn(c, d, generator=g), dim=-1)

    def make(n):
        y = torch.arange(n) % c
        return F.normalize(means[y] + 0.5 * torch.randn(n, d, generator=g), dim=-1).double(), y

    (xtr, ytr), (xte, yte) = make(120), make(300)
    idx = sample_k_shot(ytr, 3, seed=1)
    assert torch.bincount(ytr[idx]).tolist() == [3] * c
    assert not torch.equal(idx, sample_k_shot(ytr, 3, seed=2))
    zs = F.normalize(means.T + 0.2 * torch.randn(d, c, generator=g), dim=0).double()
    curve = few_shot_curve(xtr, ytr, xte, yte, c, zs, ks=(1, 4), seeds=(0, 1), lams=lambda_grid(1e-3, 1e1, 5))
    ref_zs = ((xte @ zs).argmax(1) == yte).double().mean().item()
    assert curve["zero_shot"] == pytest.approx(ref_zs)
    for kind in ("linear_probe", "zero_shot_prior"):
        runs = curve[kind]["runs"]
        assert curve[kind]["mean"] == pytest.approx([float(np.mean(r)) for r in runs])
        assert curve[kind]["std"] == pytest.approx([float(np.std(r, ddof=1)) for r in runs])
    # the prior keeps 1-shot close to zero-shot, where the plain probe falls far below it
    assert curve["zero_shot_prior"]["mean"][0] >= ref_zs - 0.03
    assert curve["zero_shot_prior"]["mean"][0] > curve["linear_probe"]["mean"][0]
    png = plot_few_shot(curve, tmp_path / "fewshot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not math.isnan(curve["linear_probe"]["mean"][1])


def test_few_shot_says_when_classes_have_fewer_examples_than_k():
    """k=4 with a class of 2 examples (and one of none) is not a 4-shot result: counted and warned."""
    g = torch.Generator().manual_seed(3)
    ytr = torch.tensor([0] * 6 + [1] * 2 + [2] * 6)  # class 3 has no training example at all
    xtr, xte = torch.randn(14, 8, generator=g).double(), torch.randn(8, 8, generator=g).double()
    with pytest.warns(UserWarning, match=r"k=4: 2 of 4 classes have fewer .*fewest: 0"):
        curve = few_shot_curve(xtr, ytr, xte, torch.arange(8) % 4, 4, ks=(1, 4), seeds=(0,), lams=[1.0])
    assert curve["classes_below_k"] == [1, 2]
