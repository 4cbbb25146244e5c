"""Parameter groups, the warm-up + cosine schedule, state round trips and gradient clipping."""

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from clipforge.models import create_model
from clipforge.train.optim import build_optimizer, clip_gradients, cosine_schedule, param_groups


def _names_by_group(model, groups):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [[name_of[id(p)] for p in g["params"]] for g in groups]


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-rn"])
def test_groups_cover_every_trainable_parameter_once(preset):
    model = create_model(preset)
    groups = param_groups(model, 0.2)
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]
    decay, no_decay = _names_by_group(model, groups)
    all_names = [n for n, _ in model.named_parameters()]
    assert sorted(decay + no_decay) == sorted(all_names)  # each exactly once
    params = dict(model.named_parameters())
    # embedding tables (the patch-embedding conv is a linear map: either group is defensible)
    tables = {"text.token_embedding.weight", "text.pos_embed", "visual.pos_embed", "visual.class_embedding"}
    tables |= {"visual.attnpool.pos_embed", "visual.patch_embed.weight"}
    for name in no_decay:  # what the paper exempts: gains, biases, embeddings, the temperature
        assert params[name].ndim < 2 or name in tables or name == "logit_scale", name
    for name in decay:
        assert params[name].ndim >= 2 and (name not in tables or name == "visual.patch_embed.weight"), name
    assert "logit_scale" in no_decay and "text.token_embedding.weight" in no_decay
    assert "text.pos_embed" in no_decay and "text.ln_final.weight" in no_decay
    assert any(n.endswith(".bias") for n in no_decay)
    assert "text.proj" in decay
    assert ("visual.proj" if preset == "tiny-vit" else "visual.attnpool.c_proj.weight") in decay
    assert any(n.endswith("qkv.weight") for n in decay) and any(n.endswith("mlp.fc.weight") for n in decay)
    if preset == "tiny-vit":
        assert "visual.class_embedding" in no_decay and "visual.pos_embed" in no_decay
    else:
        assert "visual.bn1.weight" in no_decay and "visual.conv1.weight" in decay


def test_frozen_parameters_are_excluded():
    model = create_model("tiny-vit")
    model.visual.requires_grad_(False)  # LiT: locked image tower
    decay, no_decay = _names_by_group(model, param_groups(model, 0.1))
    assert not any(n.startswith("visual.") for n in decay + no_decay)
    assert sorted(decay + no_decay) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.1)


def test_fallback_rule_without_no_weight_decay():
    model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "lin": nn.Linear(4, 4), "ln": nn.LayerNorm(4)})
    model.logit_scale = nn.Parameter(torch.zeros(1, 1))  # 2-D on purpose: excluded by name
    decay, no_decay = _names_by_group(model, param_groups(model, 0.5))
    assert decay == ["lin.weight"]
    assert sorted(no_decay) == ["embed.weight", "lin.bias", "ln.bias", "ln.weight", "logit_scale"]


def test_build_optimizer_settings():
    model = create_model("tiny-vit")
    opt = build_optimizer(model, lr=5e-4)
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (5e-4, (0.9, 0.98), 1e-6, 0.2)
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_decay_acts_only_on_the_decay_group():
    """With zero gradients, AdamW's decoupled decay shrinks decayed weights by (1 - lr*wd) and leaves
    the rest untouched."""
    model = create_model("tiny-vit")
    before = copy.deepcopy(model.state_dict())
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decay, no_decay = _names_by_group(model, opt.param_groups)
    params = dict(model.named_parameters())
    for n in decay:
        torch.testing.assert_close(params[n].detach(), before[n] * (1 - 0.1 * 0.5))
    for n in no_decay:
        assert torch.equal(params[n].detach(), before[n]), n


def test_cosine_schedule_closed_form():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = cosine_schedule(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    seen = []
    for _ in range(130):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # hand-derived: warm-up (s+1)/10; cosine over steps 10..110 from 1 to 0.1; flat afterwards
    expected = {
        0: 0.1,
        4: 0.5,
        9: 1.0,
        10: 1.0,
        35: 0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2,
        60: 0.55,
        110: 0.1,
        129: 0.1,
    }
    for step, lr in expected.items():
        assert math.isclose(seen[step], lr, rel_tol=1e-9, abs_tol=1e-12), (step, seen[step], lr)
    assert all(a >= b for a, b in itertools.pairwise(seen[9:]))  # monotone after warm-up


def test_schedule_without_warmup_starts_at_peak():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    cosine_schedule(opt, warmup_steps=0, total_steps=4)
    assert opt.param_groups[0]["lr"] == 2.0


def _train(model, opt, sched, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, t = torch.randn(4, 3, 32, 32, generator=g), torch.randint(1, 100, (4, 8), generator=g)
        t[:, -1] = 49407
        out = model(x, t)
        loss = (out.logits_per_image() - torch.eye(4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_optimizer_and_scheduler_state_round_trip():
    model = create_model("tiny-vit")
    opt = build_optimizer(model, lr=1e-3)
    sched = cosine_schedule(opt, 2, 10, min_lr_ratio=0.05)
    _train(model, opt, sched, 3, seed=1)
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})

    clone = create_model("tiny-vit")
    clone.load_state_dict(state["model"])
    opt2 = build_optimizer(clone, lr=1e-3)
    sched2 = cosine_schedule(opt2, 100, 1000)  # wrong settings on purpose: the state restores them
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert sched2.lr_lambdas[0].__dict__ == sched.lr_lambdas[0].__dict__
    _train(model, opt, sched, 3, seed=2)
    _train(clone, opt2, sched2, 3, seed=2)
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
    for (n, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), n


def test_clip_gradients_matches_manual_norm():
    model = create_model("tiny-vit")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    norm = clip_gradients(model, max_norm=1.0)
    assert math.isclose(float(norm), total, rel_tol=5e-4)  # fp32 sum of ~3M squares
    after = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    assert math.isclose(after, 1.0, rel_tol=1e-4)
    assert float(clip_gradients(model, max_norm=10.0)) == pytest.approx(1.0, rel=1e-4)  # under: unchanged
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    with pytest.raises(ValueError, match="needs the optimizer"):
        clip_gradients(model, 1.0, scaler=scaler)


def test_default_optimizer_is_fused_where_torch_offers_it_and_equals_the_for_loop():
    """The fused kernel is a speed choice only: same state keys (checkpoints interchangeable) and the same
    updates as torch's reference for-loop AdamW within float32 rounding."""
    torch.manual_seed(0)
    model = create_model("tiny-vit")
    ref_model = copy.deepcopy(model)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.2)
    try:
        torch.optim.AdamW([nn.Parameter(torch.zeros(2))], fused=True)
        assert opt.defaults["fused"], "torch offers fused AdamW on CPU here but it was not chosen"
    except (RuntimeError, ValueError):
        assert not opt.defaults.get("fused")
    ref = torch.optim.AdamW(param_groups(ref_model, 0.2), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, foreach=False)
    for _ in range(5):
        for p, q in zip(model.parameters(), ref_model.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert [sorted(s) for s in opt.state_dict()["state"].values()] == [
        sorted(s) for s in ref.state_dict()["state"].values()
    ]
