"""LiT tower policies: every L/U/u combination, locked weights bit-identical under AdamW + weight decay,
frozen BatchNorm statistics, unlocking the last N blocks, pretrained sources."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clipforge.checkpoints import save_pretrained
from clipforge.config import CLIPConfig, TextConfig, VisionConfig
from clipforge.lit import LiTPolicy, build_lit_model
from clipforge.lit.locking import is_fully_locked, lock_tower
from clipforge.models import create_model
from clipforge.train.optim import build_optimizer
from clipforge.train.step import contrastive_step

VIT = CLIPConfig(
    embed_dim=16,
    vision=VisionConfig(kind="vit", image_size=16, width=32, layers=2, heads=2, patch_size=8),
    text=TextConfig(context_length=12, vocab_size=64, width=32, heads=2, layers=2),
)
RN = dataclasses.replace(
    VIT, vision=VisionConfig(kind="resnet", image_size=32, width=8, layers=(1, 1, 1, 1), heads=2)
)


class _Tok:
    """A stand-in tokenizer: vocab 64, EOT = 63 (the largest id)."""

    vocab_size, eot_token_id, sot_token_id, context_length = 64, 63, 62, 12


def _tokens(n: int, g: torch.Generator) -> torch.Tensor:
    t = torch.zeros(n, 12, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(2, 10, (), generator=g))
        t[i, 0], t[i, 1 : k + 1], t[i, k + 1] = 62, torch.randint(1, 60, (k,), generator=g), 63
    return t


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two pretrained CLIP checkpoints on disk (ViT and ResNet image towers, same text tower shape)."""
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, cfg in (("vit", VIT), ("rn", RN)):
        torch.manual_seed(1)
        m = create_model(cfg)
        with torch.no_grad():  # BN statistics that differ from the init, so freezing them is visible
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.1, 0.1)
                    mod.running_var.uniform_(0.9, 1.1)
                    mod.weight.uniform_(0.5, 1.5)
        save_pretrained(m, d / name)
        out[name] = (d / name, m)
    return out


def _train(model, steps: int = 3, n: int = 8, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.2)  # decoupled decay would move any param it holds
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        contrastive_step(model, torch.randn(n, 3, size, size, generator=g), _tokens(n, g))
        opt.step()
    return opt


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _identical(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _all_moved(before, module) -> bool:
    after = module.state_dict()
    return all(not torch.equal(before[k], after[k]) for k, p in module.named_parameters() if k in before)


@pytest.mark.filterwarnings("ignore:.*no tokenizer returned")
@pytest.mark.parametrize("spec", ["Lu", "LU", "Uu", "UU", "uu", "UL", "uL", "LL"])
def test_every_policy(sources, spec):
    path, pre = sources["vit"]
    policy = LiTPolicy.parse(spec)
    torch.manual_seed(0)
    model, _ = build_lit_model(spec, preset=VIT, image=path if policy.image.pretrained else None,
                               text=path if policy.text.pretrained else None, tokenizer=_Tok())  # fmt: skip
    towers = {"image": (model.visual, pre.visual, policy.image), "text": (model.text, pre.text, policy.text)}
    for tower, pretrained, pol in towers.values():
        same = _identical(_snapshot(tower), pretrained.state_dict())
        assert same == pol.pretrained, f"{spec}: pretrained weights loaded iff the policy says so"
    before = {k: _snapshot(t) for k, (t, _, _) in towers.items()}
    opt = _train(model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, (tower, _, pol) in towers.items():
        if pol.locked:
            assert _identical(before[name], tower.state_dict()), f"{spec}: locked {name} tower moved"
            assert not any(id(p) in in_opt for p in tower.parameters()), (
                f"{spec}: locked {name} tower in optimizer"
            )
            assert not tower.training and is_fully_locked(tower)
        else:
            assert _all_moved(before[name], tower), (
                f"{spec}: every parameter of the unlocked {name} tower trains"
            )
            assert tower.training


def test_locked_tower_runs_without_grad_and_ignores_masking(sources):
    model, _ = build_lit_model("Lu", preset=VIT, image=sources["vit"][0], tokenizer=_Tok())
    model.train()
    x = torch.randn(4, 3, 16, 16)
    out = model.visual(x, mask_ratio=0.75)
    assert not out.requires_grad
    torch.testing.assert_close(out, sources["vit"][1].visual(x), rtol=0, atol=0)


def test_locked_resnet_keeps_batchnorm_statistics(sources):
    path, pre = sources["rn"]
    locked, _ = build_lit_model("Lu", preset=RN, image=path, tokenizer=_Tok())
    before = _snapshot(locked.visual)
    _train(locked, size=32)
    assert _identical(before, locked.visual.state_dict())  # running_mean/var and num_batches_tracked too
    # Control: the same tower unlocked does move its statistics (so the check above can fail).
    unlocked, _ = build_lit_model("Uu", preset=RN, image=path, tokenizer=_Tok())
    _train(unlocked, size=32)
    bn = unlocked.visual.bn1
    assert not torch.equal(bn.running_mean, pre.visual.bn1.running_mean)


@pytest.mark.parametrize("cfg, size", [(VIT, 16), (RN, 32)])
def test_unlock_last_blocks(sources, cfg, size):
    path = sources["vit" if cfg is VIT else "rn"][0]
    policy = LiTPolicy.parse("Lu", image_unlocked_blocks=1)
    model, _ = build_lit_model(policy, preset=cfg, image=path, tokenizer=_Tok())
    vis = model.visual
    if cfg is VIT:
        last, frozen, head = (
            vis.transformer.blocks[-1],
            [vis.transformer.blocks[0], vis.patch_embed, vis.ln_pre],
            [vis.ln_post],
        )
    else:
        last, frozen, head = vis.layer4[-1], [vis.layer1, vis.layer3, vis.bn1], [vis.attnpool]
    snaps = {id(m): _snapshot(m) for m in [last, *frozen, *head]}
    proj_before = vis.proj.clone() if cfg is VIT else None
    _train(model, size=size)
    for m in frozen:
        assert _identical(snaps[id(m)], m.state_dict()), f"locked part {type(m).__name__} moved"
        assert not m.training
    for m in [last, *head]:
        assert _all_moved(snaps[id(m)], m), f"unlocked part {type(m).__name__} did not train"
        assert m.training
    if proj_before is not None:
        assert not torch.equal(proj_before, vis.proj)


def test_policy_parse_errors():
    with pytest.raises(ValueError, match="two letters"):
        LiTPolicy.parse("Lx")
    with pytest.raises(ValueError, match="only applies to a locked"):
        LiTPolicy.parse("Uu", image_unlocked_blocks=2)
    with pytest.raises(ValueError, match="needs a pretrained image tower"):
        build_lit_model("Lu", preset=VIT, tokenizer=_Tok())
    with pytest.raises(ValueError, match="has 2 blocks"):
        lock_tower(create_model(VIT).visual, unlocked_blocks=3)


def test_unlocked_blocks_train_exactly_the_last_blocks_and_head():
    """unlocked_blocks=1 trains the last block and the head (final norm, projection), nothing else: the
    class token and position embeddings stay locked (issue 11: they used to train, pulling gradients
    through the locked lower blocks)."""
    vit = lock_tower(create_model(VIT).visual, unlocked_blocks=1)
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    last = {f"transformer.blocks.1.{n}" for n, _ in vit.transformer.blocks[1].named_parameters()}
    assert trainable == last | {"ln_post.weight", "ln_post.bias", "proj"}
    rn = lock_tower(create_model(RN).visual, unlocked_blocks=1)
    trainable = {n for n, p in rn.named_parameters() if p.requires_grad}
    last = {f"layer4.0.{n}" for n, _ in rn.layer4[0].named_parameters()}
    assert trainable == last | {f"attnpool.{n}" for n, _ in rn.attnpool.named_parameters()}


def test_unlocked_blocks_gradients_and_updates_reach_only_the_unlocked_part():
    """After a backward pass and an AdamW step (with weight decay): gradients exist exactly for the
    trainable set, and exactly those parameters changed; text tower likewise (its position embedding)."""
    model = create_model(VIT)
    lock_tower(model.visual, unlocked_blocks=1)
    lock_tower(model.text, unlocked_blocks=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    size = model.config.vision.image_size
    out = model(
        torch.randn(4, 3, size, size),
        torch.randint(1, model.config.text.vocab_size, (4, model.config.text.context_length)),
    )
    (out.image_features @ out.text_features.T).sum().backward()
    opt.step()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n != "logit_scale"}
    assert with_grad == trainable and changed <= trainable  # (the loss here has no temperature)
    for name in (
        "visual.class_embedding",
        "visual.pos_embed",
        "text.pos_embed",
        "visual.transformer.blocks.0.attn.qkv.weight",
    ):
        assert name not in with_grad and name not in changed, name
    assert "visual.transformer.blocks.1.mlp.fc.weight" in changed and "visual.proj" in changed


def test_locking_needs_the_tower_contract():
    with pytest.raises(TypeError, match="Linear is not a tower: give it blocks\\(\\), head\\(\\)"):
        lock_tower(torch.nn.Linear(2, 2))
