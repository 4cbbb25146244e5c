"""Losses against slow, obviously-correct loop implementations (scalar maths), values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.loss import (
    OBJECTIVES,
    clip_loss,
    clip_loss_local_vs_global,
    get_loss,
    get_objective,
    siglip_loss,
)


def _dot(x, y, i, j):
    return sum(x[i, d] * y[j, d] for d in range(x.shape[1]))


def _logsumexp(values):
    top = max(
        float(v.detach()) for v in values
    )  # shift for stability; a constant, so gradients are unchanged
    return top + torch.log(sum(torch.exp(v - top) for v in values))


def slow_clip_loss(x, y, scale, lam=0.5, labels=None):
    """Loops over i, j with scalar maths: lam * mean CE(image->text) + (1 - lam) * mean CE(text->image)."""
    n, m = x.shape[0], y.shape[0]
    labels = list(range(n)) if labels is None else [int(v) for v in labels]
    s = [[scale * _dot(x, y, i, j) for j in range(m)] for i in range(n)]
    i2t = sum(_logsumexp(s[i]) - s[i][labels[i]] for i in range(n)) / n
    t2i = 0.0
    for k in range(n):  # text labels[k] is the positive of image k; softmax over the n images
        col = [s[i][labels[k]] for i in range(n)]
        t2i = t2i + _logsumexp(col) - col[k]
    return lam * i2t + (1 - lam) * t2i / n


def slow_siglip_loss(x, y, scale, bias, labels=None, negative_only=False):
    n, m = x.shape[0], y.shape[0]
    labels = list(range(n)) if labels is None else [int(v) for v in labels]
    total = 0.0
    for i in range(n):
        for j in range(m):
            z = 1.0 if (not negative_only and labels[i] == j) else -1.0
            u = z * (scale * _dot(x, y, i, j) + bias)
            total = total - (-torch.log1p(torch.exp(-u)))  # log sigmoid(u) = -log(1 + e^-u)
    return total / n


def _features(n, m, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    return x, y


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("lam", [0.5, 0.0, 0.3, 1.0])
def test_clip_loss_square_matches_loop(n, lam):
    x, y = _features(n, n, seed=n)
    scale = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    fast, slow = clip_loss(x, y, scale, lam=lam), slow_clip_loss(x, y, scale, lam=lam)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grads(fast, (x, y, scale)), _grads(slow, (x, y, scale))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n,m", [(3, 5), (4, 7)])
@pytest.mark.parametrize("permuted", [False, True])
def test_clip_loss_non_square_and_labels(n, m, permuted):
    x, y = _features(n, m, seed=m)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    labels = torch.randperm(m)[:n] if permuted else None
    fast = clip_loss(x, y, scale, lam=0.3, labels=labels)
    slow = slow_clip_loss(x, y, scale, lam=0.3, labels=labels)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grads(fast, (x, y, scale)), _grads(slow, (x, y, scale))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_clip_loss_equal_weighting_is_symmetric():
    x, y = _features(4, 4)
    assert torch.allclose(clip_loss(x, y, 10.0), clip_loss(y, x, 10.0))
    assert not torch.allclose(clip_loss(x, y, 10.0, lam=0.9), clip_loss(y, x, 10.0, lam=0.9))


@pytest.mark.parametrize("world", [2, 3])
def test_local_vs_global_averages_to_global_loss_and_gradient(world):
    n = 2
    x, y = _features(n * world, n * world, seed=world)
    scale = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    full = clip_loss(x, y, scale, lam=0.4)
    # One process plays every rank: rank r holds rows r*n .. r*n+n-1 and sees the gathered x, y.
    per_rank = [
        clip_loss_local_vs_global(x[r * n : (r + 1) * n], y[r * n : (r + 1) * n], x, y, scale, r * n, lam=0.4)
        for r in range(world)
    ]
    mean = sum(per_rank) / world
    torch.testing.assert_close(mean, full, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grads(mean, (x, y, scale)), _grads(full, (x, y, scale))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n,m", [(1, 1), (3, 3), (5, 5), (3, 6)])
def test_siglip_loss_matches_loop(n, m):
    x, y = _features(n, m, seed=n + m)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    fast, slow = siglip_loss(x, y, scale, bias), slow_siglip_loss(x, y, scale, bias)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grads(fast, (x, y, scale, bias)), _grads(slow, (x, y, scale, bias))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_siglip_labels_and_negative_only_match_loop():
    x, y = _features(3, 5, seed=3)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([4, 0, 2])
    for kw in ({"labels": labels}, {"negative_only": True}):
        fast, slow = siglip_loss(x, y, scale, bias, **kw), slow_siglip_loss(x, y, scale, bias, **kw)
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
        for a, b in zip(_grads(fast, (x, y, scale, bias)), _grads(slow, (x, y, scale, bias))):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_siglip_chunked_over_text_blocks_equals_whole():
    """SigLIP's multi-device form: own block with positives + other blocks negative-only, / local N."""
    x, y = _features(4, 4, seed=9)
    whole = siglip_loss(x, y, 10.0, -10.0)
    own = (
        siglip_loss(x[:2], y[:2], 10.0, -10.0) * 2
        + siglip_loss(x[:2], y[2:], 10.0, -10.0, negative_only=True) * 2
    )
    other = (
        siglip_loss(x[2:], y[2:], 10.0, -10.0) * 2
        + siglip_loss(x[2:], y[:2], 10.0, -10.0, negative_only=True) * 2
    )
    torch.testing.assert_close((own + other) / 4, whole, rtol=1e-12, atol=1e-12)


def test_loss_on_perfect_alignment():
    """Orthonormal matched pairs: InfoNCE -> log(1 + (N-1) e^-t) in closed form."""
    n, t = 4, 5.0
    x = torch.eye(n)
    expected = math.log(1 + (n - 1) * math.exp(-t))
    assert math.isclose(float(clip_loss(x, x, t)), expected, rel_tol=1e-6)


def test_errors_name_the_problem():
    x, y = _features(4, 3)
    with pytest.raises(ValueError, match="4 images but only 3 texts"):
        clip_loss(x, y, 1.0)
    with pytest.raises(ValueError, match="width"):
        clip_loss(x, torch.randn(4, 5, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="logit_bias"):
        get_loss("siglip")(x, x, 1.0, None)
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("triplet")
    with pytest.raises(ValueError, match="offset"):
        clip_loss_local_vs_global(x[:2], x[:2], x, x, 1.0, offset=3)


def test_get_loss_uniform_signature():
    x, y = _features(3, 3)
    assert torch.equal(get_loss("clip", lam=0.2)(x, y, 3.0, None), clip_loss(x, y, 3.0, lam=0.2))
    assert torch.equal(get_loss("siglip")(x, y, 3.0, -1.0), siglip_loss(x, y, 3.0, -1.0))


# ------------------------------------------------------------------------------------------ the registry
# Every entry of OBJECTIVES is checked here without edits: a new objective gets these tests for free.
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("sizes", [[3], [2, 2], [3, 1, 2]])
def test_objective_gathered_form_averages_to_local_form(name, sizes):
    """One process plays every rank: rank r holds rows offset_r .. offset_r + n_r - 1 and sees the gathered
    features it declares in `gathers` (None for the others). sum_r (n_r / M) gathered_r == local(all), values
    and gradients; slicing the same leaf sums every rank's gradient into the owner's rows, as all_gather's
    backward does."""
    obj = OBJECTIVES[name]
    m = sum(sizes)
    x, y = _features(m, m, seed=len(sizes))
    scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    all_img = x if "image" in obj.gathers else None
    all_txt = y if "text" in obj.gathers else None
    total, offset = 0.0, 0
    for n in sizes:
        rows = slice(offset, offset + n)
        total = total + n / m * obj.gathered(x[rows], y[rows], all_img, all_txt, scale, bias, offset, lam=0.3)
        offset += n
    whole = obj.local(x, y, scale, bias, lam=0.3)
    torch.testing.assert_close(total, whole, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grads(total, (x, y, scale)), _grads(whole, (x, y, scale))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_facts_hold(name):
    obj = OBJECTIVES[name]
    assert set(obj.gathers) <= {"image", "text"} and obj.gathers and obj.bytes_per_logit > 0
    x, y = _features(3, 3)
    assert torch.equal(get_loss(name, lam=0.2)(x, y, 5.0, -1.0), obj.local(x, y, 5.0, -1.0, lam=0.2))
    if obj.needs_bias:
        with pytest.raises(ValueError, match="logit_bias"):
            obj.local(x, y, 5.0, None)
        with pytest.raises(ValueError, match="logit_bias"):
            obj.gathered(x[:1], y[:1], x, y, 5.0, None, 0)
    else:
        assert torch.isfinite(obj.local(x, y, 5.0, None))
        assert torch.isfinite(obj.gathered(x[:1], y[:1], x, y, 5.0, None, 0))


def test_registry_names_are_the_configs_choices():
    from clipforge.train.experiment import TrainSpec

    for name in OBJECTIVES:
        assert TrainSpec(loss=name).loss == name
    with pytest.raises(ValueError, match=r"train\.loss must be one of \['clip', 'siglip'"):
        TrainSpec(loss="triplet")
    with pytest.raises(ValueError, match=r"unknown loss 'triplet'; choose one of \['clip', 'siglip'"):
        get_objective("triplet")
