"""Exact gradient accumulation: K cached micro-batches give the gradient of one big contrastive batch."""

import dataclasses
import math

import pytest
import torch

from clipforge.config import get_config
from clipforge.loss import clip_loss, get_loss
from clipforge.models import create_model
from clipforge.train.step import (
    accumulation_memory_bytes,
    contrastive_step,
    make_step_fn,
    max_effective_batch,
    trim_tokens,
)
from helpers import random_batch

VOCAB = 1000  # small vocabulary: the tests then time the towers, not a 49408 x 64 embedding gradient
EOT = VOCAB - 1


def _model(preset, siglip=False):
    cfg = get_config(preset)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=VOCAB))
    if siglip:
        cfg = dataclasses.replace(cfg, init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    torch.manual_seed(0)
    return create_model(cfg)


def _reference_grads(model, images, texts, loss_fn, chunks=1, mask_ratio=0.0):
    """The obvious computation: forward every micro-batch with grad into one graph (all activations
    alive), concatenate, one loss, one backward. chunks=1 is the plain full batch."""
    model.zero_grad(set_to_none=True)
    outs = [
        model(i, t, mask_ratio=mask_ratio)
        for i, t in zip(images.tensor_split(chunks), texts.tensor_split(chunks))
    ]
    img = torch.cat([o.image_features for o in outs])
    txt = torch.cat([o.text_features for o in outs])
    loss = loss_fn(img, txt, outs[0].logit_scale, outs[0].logit_bias)
    loss.backward()
    return float(loss.detach()), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def _step_grads(model, images, texts, loss_fn, **kw):
    model.zero_grad(set_to_none=True)
    result = contrastive_step(model, images, texts, loss_fn, **kw)
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got, want):
    """fp32 tolerance: rtol 1e-4, and an absolute slack of 1e-5 of the tensor's largest gradient (rounding
    scales with the terms summed; some true gradients are exactly 0, e.g. attention key biases)."""
    assert got.keys() == want.keys()
    for name in want:
        atol = max(1e-6, 1e-5 * float(want[name].abs().max()))
        torch.testing.assert_close(
            got[name], want[name], rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


LOSSES = {"clip": get_loss("clip"), "clip-lam": get_loss("clip", lam=0.3), "siglip": get_loss("siglip")}


@pytest.mark.parametrize("loss", ["clip", "clip-lam", "siglip"])
@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-rn"])
def test_accumulated_gradient_equals_full_batch(preset, loss):
    model = _model(preset, siglip=loss == "siglip")
    if preset == "tiny-rn":
        model.eval()  # BN on running statistics: the full batch and its micro-batches normalise alike
    images, texts = random_batch(8, model.image_size, VOCAB)
    full_loss, full = _reference_grads(model, images, texts, LOSSES[loss])
    result, accum = _step_grads(model, images, texts, LOSSES[loss], accum_steps=4)
    assert math.isclose(result.loss, full_loss, rel_tol=1e-5)
    assert len(full) == len(list(model.parameters()))  # every parameter gets a gradient
    _assert_same_grads(accum, full)
    assert accum["logit_scale"].abs() > 0  # accumulated once, from the whole-batch loss


def test_uneven_micro_batches_and_one_step():
    model = _model("tiny-vit")
    images, texts = random_batch(10, model.image_size, VOCAB)
    _, full = _reference_grads(model, images, texts, LOSSES["clip"])
    for k in (1, 3, 4, 10):  # sizes 10; 4,3,3; 3,3,2,2; ten singletons
        _, accum = _step_grads(model, images, texts, LOSSES["clip"], accum_steps=k)
        _assert_same_grads(accum, full)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_masked_accumulation_replays_the_same_masks(loss):
    model = _model("tiny-vit", siglip=loss == "siglip")
    images, texts = random_batch(8, model.image_size, VOCAB)
    torch.manual_seed(123)
    ref_loss, ref = _reference_grads(model, images, texts, LOSSES[loss], chunks=4, mask_ratio=0.5)
    rng_after_ref = torch.get_rng_state()
    torch.manual_seed(123)
    result, accum = _step_grads(model, images, texts, LOSSES[loss], accum_steps=4, mask_ratio=0.5)
    assert math.isclose(result.loss, ref_loss, rel_tol=1e-5)
    _assert_same_grads(accum, ref)
    assert torch.equal(torch.get_rng_state(), rng_after_ref)  # as if each micro-batch ran once
    # the masks matter: a different seed gives a different gradient
    torch.manual_seed(7)
    _, other = _step_grads(model, images, texts, LOSSES[loss], accum_steps=4, mask_ratio=0.5)
    assert not torch.allclose(other["visual.proj"], ref["visual.proj"], rtol=1e-3)


def test_resnet_train_mode_batchnorm_per_micro_batch_and_stats_updated_once():
    model = _model("tiny-rn")
    images, texts = random_batch(8, model.image_size, VOCAB)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, ref = _reference_grads(model, images, texts, LOSSES["clip"], chunks=4)
    ref_buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.load_state_dict(state)
    _, accum = _step_grads(model, images, texts, LOSSES["clip"], accum_steps=4)
    _assert_same_grads(accum, ref)
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf, ref_buffers[name], rtol=1e-5, atol=1e-7, msg=name)
    assert int(model.visual.bn1.num_batches_tracked) == 4


def test_gradient_checkpointing_with_accumulation():
    model = _model("tiny-vit")
    images, texts = random_batch(8, model.image_size, VOCAB)
    _, full = _reference_grads(model, images, texts, LOSSES["clip"])
    model.set_grad_checkpointing(True)
    _, accum = _step_grads(model, images, texts, LOSSES["clip"], accum_steps=2)
    _assert_same_grads(accum, full)


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-rn"])
def test_locked_image_tower_accumulates_like_the_full_batch(preset):
    """LiT (Lu): the locked tower's features carry no graph; the accumulated step skips them and the
    text tower / temperature get the full-batch gradient; the locked tower gets none."""
    from clipforge.lit.locking import apply_policy

    model = apply_policy(_model(preset), "Lu").train()  # a locked ResNet stays in eval mode (frozen BN)
    images, texts = random_batch(8, model.image_size, VOCAB)
    _, full = _reference_grads(model, images, texts, LOSSES["clip"])
    before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    _, accum = _step_grads(model, images, texts, LOSSES["clip"], accum_steps=4)
    assert not any(n.startswith("visual.") for n in full) and "text.proj" in full
    _assert_same_grads(accum, full)
    for k, v in model.visual.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running statistics included


def test_trim_tokens_is_exact():
    model = _model("tiny-vit")
    _, texts = random_batch(5, model.image_size, VOCAB)
    trimmed = trim_tokens(texts)
    longest = max(int((row == EOT).nonzero()[0]) for row in texts) + 1  # by hand, from the EOT positions
    assert trimmed.shape == (5, longest) and torch.equal(trimmed, texts[:, :longest])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(trimmed), model.encode_text(texts), rtol=0, atol=0)
    images, _ = random_batch(5, model.image_size, VOCAB)
    result = contrastive_step(model, images, texts, "clip")
    assert result.text_length == longest and result.batch_size == 5


def test_bf16_autocast_runs_and_is_close_to_fp32():
    model = _model("tiny-vit")
    images, texts = random_batch(8, model.image_size, VOCAB)
    fp32, _ = _step_grads(model, images, texts, LOSSES["clip"], accum_steps=2)
    bf16, grads = _step_grads(
        model, images, texts, LOSSES["clip"], accum_steps=2, autocast_dtype=torch.bfloat16
    )
    assert math.isfinite(bf16.loss) and abs(bf16.loss - fp32.loss) < 0.02 * fp32.loss
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(g.dtype == torch.float32 for g in grads.values())


def test_scaler_and_backward_hooks_scale_every_micro_batch():
    """A fp16-style scaled backward multiplies every gradient, cached micro-batches included."""
    model = _model("tiny-vit")
    images, texts = random_batch(8, model.image_size, VOCAB)
    _, plain = _step_grads(model, images, texts, LOSSES["clip"], accum_steps=4)
    calls = []

    def backward(loss):
        calls.append(float(loss.detach()))
        (loss * 8.0).backward()

    _, scaled = _step_grads(model, images, texts, LOSSES["clip"], accum_steps=4, backward=backward)
    assert len(calls) == 1
    _assert_same_grads({n: g / 8.0 for n, g in scaled.items()}, plain)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)  # the fp16 code path's loss scaling
    _, scaled = _step_grads(model, images, texts, LOSSES["clip"], accum_steps=4, scaler=scaler)
    _assert_same_grads({n: g / 16.0 for n, g in scaled.items()}, plain)


def test_make_step_fn_batches_and_unmasked_tuning():
    model = _model("tiny-vit")
    images, texts = random_batch(8, model.image_size, VOCAB)
    step_fn = make_step_fn("clip", accum_steps=2, mask_ratio=0.5, unmasked_from_step=10)
    model.zero_grad(set_to_none=True)
    loss = step_fn(model, {"image": images, "text": texts}, step=10)  # unmasked: deterministic
    want = clip_loss(*(lambda o: (o.image_features, o.text_features, o.logit_scale))(model(images, texts)))
    assert math.isclose(float(loss), float(want.detach()), rel_tol=1e-5)
    torch.manual_seed(3)
    masked = step_fn(model, (images, texts), step=9)
    torch.manual_seed(3)
    ref_loss, _ = _reference_grads(model, images, texts, get_loss("clip"), chunks=2, mask_ratio=0.5)
    assert math.isclose(float(masked), ref_loss, rel_tol=1e-5) and float(masked) != float(loss)


def test_masks_differ_across_ranks_and_follow_the_step(monkeypatch):
    """Every rank starts from run.seed (for an identical model init), so the global RNG gave every rank the
    same FLIP masks for its rows. With `seed` the masks come from (seed, step, rank): different ranks draw
    different ones, and the same step draws the same ones whatever the global RNG holds (resumes)."""
    model = _model("tiny-vit")
    images, texts = random_batch(8, model.image_size, VOCAB)
    step_fn = make_step_fn("clip", mask_ratio=0.5, seed=0)

    def loss_on(rank: int, global_seed: int) -> float:
        monkeypatch.setenv("RANK", str(rank))  # no process group: get_rank() reads torchrun's RANK
        torch.manual_seed(global_seed)
        model.zero_grad(set_to_none=True)
        return float(step_fn(model, (images, texts), step=5))

    rank0 = loss_on(0, global_seed=0)
    assert loss_on(1, global_seed=0) != rank0  # the same global RNG state, another rank: other masks
    assert loss_on(0, global_seed=123) == rank0  # the masks are those of (seed, step, rank) alone
    state = torch.get_rng_state()
    step_fn(model, (images, texts), step=5)
    assert torch.equal(torch.get_rng_state(), state)  # the step leaves the global RNG as it was


def test_step_errors():
    model = _model("tiny-vit")
    images, texts = random_batch(4, model.image_size, VOCAB)
    with pytest.raises(ValueError, match="accum_steps"):
        contrastive_step(model, images, texts, "clip", accum_steps=5)
    with pytest.raises(ValueError, match="pairs"):
        contrastive_step(model, images, texts[:3], "clip")
    with pytest.raises(ValueError, match="logit_bias"):
        contrastive_step(model, images, texts, "siglip")
    rn = _model("tiny-rn")
    images, texts = random_batch(4, rn.image_size, VOCAB)
    with pytest.raises(ValueError, match="ViT"):
        contrastive_step(rn, images, texts, "clip", mask_ratio=0.5)


def test_memory_model_for_effective_batch():
    d = 512
    assert accumulation_memory_bytes(32768, d) == 16 * 32768 * d + 16 * 32768**2
    for loss in ("clip", "siglip"):
        for budget in (2**30, 8 * 2**30, 80 * 2**30):
            b = max_effective_batch(budget, d, loss)
            assert accumulation_memory_bytes(b, d, loss) <= budget < accumulation_memory_bytes(b + 1, d, loss)
    assert max_effective_batch(0, d) == 0
