"""Model zoo: every preset builds and runs, parameter counts match OpenAI's architectures, and each fast
path (EOT truncation, SDPA, fused QuickGELU MLP, grad checkpointing, fp32 LayerNorm) agrees with a slow,
obviously-correct reference, forward and backward."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipforge import CLIPOutput, create_model, get_config, list_models
from clipforge.config import PAPER_PRESETS
from clipforge.models import IMAGE_TOWERS, Tower, build_image_tower
from clipforge.models.transformer import LayerNorm
from reference_paths import OPENAI_KEYS

SMALL_PRESETS = [name for name in list_models() if name not in PAPER_PRESETS]
KEYS_FILE = OPENAI_KEYS


def _reference_param_counts() -> dict[str, int]:
    if not KEYS_FILE.exists():
        return {}
    return {
        name: int(n) for name, n in re.findall(r"===== (\S+) keys=\d+ params=(\d+)", KEYS_FILE.read_text())
    }


def _tokens(model, eots: list[int], seed: int = 0) -> torch.Tensor:
    """Random token rows: SOT-like id, random ids, the EOT (largest id) at `eots[i]`, zero padding."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config.text
    eot_id = cfg.vocab_size - 1
    tokens = torch.zeros(len(eots), cfg.context_length, dtype=torch.long)
    for i, e in enumerate(eots):
        tokens[i, :e] = torch.randint(1, eot_id, (e,), generator=g)
        tokens[i, e] = eot_id
    return tokens


def _images(model, n: int) -> torch.Tensor:
    s = model.config.vision.image_size
    return torch.randn(n, 3, s, s)


# ---------------------------------------------------------------------------------------------- registry


def test_registry_has_the_paper_presets():
    assert set(PAPER_PRESETS) <= set(list_models())
    assert get_config("ViT-B/32") == get_config("ViT-B-32")
    assert get_config("ViT-L/14@336px") == get_config("ViT-L-14-336")


@pytest.mark.parametrize("name", SMALL_PRESETS)
def test_small_preset_forward(name):
    model = create_model(name).eval()
    cfg = model.config
    images, tokens = _images(model, 3), _tokens(model, [3, 7, cfg.text.context_length - 1])
    out = model(images, tokens)
    assert isinstance(out, CLIPOutput)
    assert out.image_features.shape == (3, cfg.embed_dim) and out.text_features.shape == (3, cfg.embed_dim)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.logit_scale, torch.tensor(1 / 0.07))
    # encode_* are unnormalised and agree with forward after normalisation.
    img = model.encode_image(images)
    assert not torch.allclose(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(F.normalize(img, dim=-1), out.image_features)
    logits = out.logits_per_image()
    torch.testing.assert_close(logits, out.logit_scale * out.image_features @ out.text_features.T)


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_preset_parameter_count(name):
    counts = _reference_param_counts()
    if name not in counts:
        pytest.skip(f"{KEYS_FILE} not available")
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == counts[name]
    assert model.config.embed_dim == model.text.proj.shape[1]


# ------------------------------------------------------------------------------- text tower vs reference


def _reference_encode_text(model, tokens: torch.Tensor) -> torch.Tensor:
    """OpenAI's text tower written out: all context positions, an explicit additive causal mask,
    softmax attention per head, QuickGELU as x * sigmoid(1.702 x), the feature at the argmax token."""
    text = model.text
    N, T = tokens.shape
    x = text.token_embedding.weight[tokens] + text.pos_embed[:T]  # (N, T, w)
    mask = torch.full((T, T), float("-inf")).triu(1)  # 0 on and below the diagonal
    for block in text.transformer.blocks:
        h = F.layer_norm(x, (x.shape[-1],), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
        q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).chunk(3, dim=-1)
        heads = block.attn.heads
        hs = q.shape[-1] // heads
        outs = []
        for i in range(heads):
            sl = slice(i * hs, (i + 1) * hs)
            att = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hs) + mask  # (N, T, T)
            outs.append(att.softmax(dim=-1) @ v[..., sl])
        x = x + torch.cat(outs, dim=-1) @ block.attn.out.weight.T + block.attn.out.bias
        h = F.layer_norm(x, (x.shape[-1],), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
        h = h @ block.mlp.fc.weight.T + block.mlp.fc.bias
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ block.mlp.proj.weight.T + block.mlp.proj.bias
    x = F.layer_norm(x, (x.shape[-1],), text.ln_final.weight, text.ln_final.bias, text.ln_final.eps)
    pooled = torch.stack([x[i, tokens[i].argmax()] for i in range(N)])
    return pooled @ text.proj


def _grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()
    }


def test_encode_text_truncation_matches_full_context_reference():
    model = create_model("tiny-vit").double()
    eots = [4, 9, 17, 2]  # longest EOT at 17: the fast path runs 18 of 77 positions
    tokens = _tokens(model, eots)
    tokens[1, 12:30] = torch.randint(1, 1000, (18,))  # junk after an EOT must not matter (causal attention)
    weights = torch.randn(len(eots), model.config.embed_dim, dtype=torch.float64)

    fast = model.encode_text(tokens)
    ref = _reference_encode_text(model, tokens)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)

    g_fast = _grads(model, (model.encode_text(tokens) * weights).sum())
    g_ref = _grads(model, (_reference_encode_text(model, tokens) * weights).sum())
    text_params = [n for n in g_ref if n.startswith("text.")]
    assert any(g_ref[n].abs().sum() > 0 for n in text_params)
    for n in text_params:
        torch.testing.assert_close(g_fast[n], g_ref[n], rtol=1e-9, atol=1e-10, msg=lambda m, n=n: f"{n}: {m}")


def test_eot_pooling_uses_argmax_position():
    model = create_model("tiny-vit").eval()
    eot_id = model.config.text.vocab_size - 1
    tokens = _tokens(model, [5, 11])
    with torch.no_grad():
        feats = model.encode_text(tokens)
        # Junk after the EOT changes nothing; the same prefix on its own gives the same feature.
        junk = tokens.clone()
        junk[0, 6:20] = torch.randint(1, eot_id, (14,))
        torch.testing.assert_close(model.encode_text(junk), feats, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens[:1, :6]), feats[:1], rtol=1e-5, atol=1e-5)
        # The pooled position follows the largest id, wherever it is.
        moved = tokens.clone()
        moved[0, 5], moved[0, 3] = 7, eot_id
        torch.testing.assert_close(
            model.encode_text(moved[:1]), model.encode_text(moved[:1, :4]), rtol=1e-5, atol=1e-5
        )
        assert not torch.allclose(model.encode_text(moved[:1]), feats[:1])


def test_encode_text_rejects_bad_shapes():
    model = create_model("tiny-vit")
    with pytest.raises(ValueError, match="context length"):
        model.encode_text(torch.zeros(1, model.config.text.context_length + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        model.encode_text(torch.zeros(77, dtype=torch.long))


# --------------------------------------------------------------------------------- training-time switches


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_grad_checkpointing_gives_identical_outputs_and_grads(name):
    model = create_model(name).train()
    images, tokens = _images(model, 2), _tokens(model, [6, 3])

    def run():
        out = model(images, tokens)
        loss = out.logits_per_image().logsumexp(dim=-1).sum() + out.image_features.sum()
        return out, _grads(model, loss)

    start = {k: v.clone() for k, v in model.state_dict().items()}
    out_plain, g_plain = run()
    buffers_plain = {n: b.clone() for n, b in model.named_buffers()}
    model.load_state_dict(start)
    model.set_grad_checkpointing(True)
    out_ckpt, g_ckpt = run()
    # The recomputation in backward must not update BatchNorm running statistics a second time.
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, buffers_plain[n], rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")
    torch.testing.assert_close(out_ckpt.image_features, out_plain.image_features, rtol=0, atol=0)
    torch.testing.assert_close(out_ckpt.text_features, out_plain.text_features, rtol=0, atol=0)
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")


def test_grad_checkpointing_switch_reaches_both_towers():
    model = create_model("tiny-vit")
    model.set_grad_checkpointing(True, text=False)
    assert model.visual.transformer.grad_checkpointing and not model.text.transformer.grad_checkpointing
    model.set_grad_checkpointing(True)
    assert model.text.transformer.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.visual.transformer.grad_checkpointing and not model.text.transformer.grad_checkpointing


# --------------------------------------------------------------------------------- the tower contract


def _towers(model) -> dict[str, nn.Module]:
    return {"visual": model.visual, "text": model.text}


@pytest.mark.parametrize("kind, preset", [("vit", "tiny-vit"), ("resnet", "tiny-rn")])
def test_image_tower_registry_builds_the_configured_tower(kind, preset):
    cfg = get_config(preset)
    assert cfg.vision.kind == kind
    tower = build_image_tower(cfg.vision, cfg.embed_dim)
    assert type(tower) is IMAGE_TOWERS[kind] and type(create_model(preset).visual) is IMAGE_TOWERS[kind]
    # The registry only builds (no init of its own): the same RNG draws as constructing the class.
    towers = []
    for build in (build_image_tower, IMAGE_TOWERS[kind]):
        torch.manual_seed(0)
        towers.append(build(cfg.vision, cfg.embed_dim))
        towers[-1].init_weights()
    a, b = (t.state_dict() for t in towers)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_build_image_tower_rejects_unknown_kind():
    import dataclasses

    vision = dataclasses.replace(get_config("tiny-vit").vision)
    object.__setattr__(vision, "kind", "convnext")  # past VisionConfig's own check
    with pytest.raises(ValueError, match=r"unknown image tower kind 'convnext'.*'resnet', 'vit'"):
        build_image_tower(vision, 16)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_every_tower_exposes_blocks_head_and_checkpointing(name):
    model = create_model(name)
    cfg = model.config
    depth = {"visual": cfg.vision.layers, "text": cfg.text.layers}
    for key, tower in _towers(model).items():
        assert isinstance(tower, Tower)
        blocks, head = tower.blocks(), tower.head()
        n = (
            sum(depth[key]) if isinstance(depth[key], tuple) else depth[key]
        )  # ResNet: Bottlenecks of all stages
        assert len(blocks) == n and all(isinstance(b, nn.Module) for b in blocks)
        # Blocks are distinct submodules; the head is made of parameters of the tower outside every block.
        owned = {id(p) for p in tower.parameters()}
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        assert len({id(b) for b in blocks}) == n
        assert head and all(id(p) in owned and id(p) not in in_blocks for p in head)
        # The projection into the joint space is part of the head.
        proj = tower.attnpool.c_proj.weight if name == "tiny-rn" and key == "visual" else tower.proj
        assert any(p is proj for p in head)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_clip_grad_checkpointing_delegates_to_each_tower(name, monkeypatch):
    model = create_model(name)
    calls = []
    for key, tower in _towers(model).items():
        monkeypatch.setattr(tower, "set_grad_checkpointing", lambda on, key=key: calls.append((key, on)))
    model.set_grad_checkpointing(True, text=False)
    model.set_grad_checkpointing(False)
    assert calls == [("visual", True), ("visual", False), ("text", False)]


def _reference_layer_norm(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    x64 = x.double()
    mu = x64.mean(-1, keepdim=True)
    var = ((x64 - mu) ** 2).mean(-1, keepdim=True)
    return (x64 - mu) / torch.sqrt(var + ln.eps) * ln.weight.double() + ln.bias.double()


@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_computes_in_fp32(weights_dtype):
    ln = LayerNorm(256)
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.2)
        ln.bias.normal_(0.0, 0.2)
    ln = ln.to(weights_dtype)
    # A large common offset: statistics computed in bf16 lose the per-feature signal.
    x = (300 + torch.randn(4, 7, 256)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x)
    assert y.dtype == torch.bfloat16
    ref = _reference_layer_norm(x, ln)
    # Only the final rounding to bf16 separates us from the float64 reference.
    torch.testing.assert_close(y.double(), ref.bfloat16().double(), rtol=1 / 128, atol=1 / 64)
    # fp32 in, fp32 out, matching nn.LayerNorm exactly.
    plain = nn.LayerNorm(256).to(weights_dtype)
    plain.load_state_dict(ln.state_dict())
    x32 = torch.randn(3, 256)
    torch.testing.assert_close(ln.float()(x32), plain.float()(x32), rtol=0, atol=0)


def test_bf16_model_matches_fp32_features():
    model = create_model("tiny-vit").eval()
    images, tokens = _images(model, 2), _tokens(model, [5, 9])
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(images), model.encode_text(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            img, txt = model.encode_image(images), model.encode_text(tokens)
        half = model.to(torch.bfloat16)
        img_w, txt_w = half.encode_image(images), half.encode_text(tokens)
    for got in (img, img_w):
        assert F.cosine_similarity(got.float(), ref_img).min() > 0.99
    for got in (txt, txt_w):
        assert F.cosine_similarity(got.float(), ref_txt).min() > 0.99


# ------------------------------------------------------------------------------------------ init, scale


def test_openai_init_facts():
    model = create_model("small-vit")
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.logit_bias is None
    text = model.text
    assert text.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert text.pos_embed.std().item() == pytest.approx(0.01, rel=0.1)
    w, n = text.transformer.width, len(text.transformer.blocks)
    block = text.transformer.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(w**-0.5, rel=0.05)
    assert block.attn.out.weight.std().item() == pytest.approx(w**-0.5 * (2 * n) ** -0.5, rel=0.05)
    assert block.mlp.fc.weight.std().item() == pytest.approx((2 * w) ** -0.5, rel=0.05)
    assert text.proj.std().item() == pytest.approx(w**-0.5, rel=0.05)


def test_resnet_init_zeroes_every_residual_bn3():
    model = create_model("tiny-rn")
    blocks = [
        b
        for stage in (model.visual.layer1, model.visual.layer2, model.visual.layer3, model.visual.layer4)
        for b in stage
    ]
    assert blocks and all(torch.equal(b.bn3.weight, torch.zeros_like(b.bn3.weight)) for b in blocks)
    assert torch.equal(model.visual.bn3.weight, torch.ones_like(model.visual.bn3.weight))  # the stem's is not


def test_logit_scale_clamped_at_100():
    model = create_model("tiny-vit")
    images, tokens = _images(model, 2), _tokens(model, [3, 4])
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
    out = model(images, tokens)
    assert out.logit_scale.item() == pytest.approx(100.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0


def _expected_no_decay(model: nn.Module) -> set[str]:
    """Gains and biases of norms, every bias, embedding tables and position/class embeddings, temperature."""
    names = set()
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for p_name, _ in mod.named_parameters(recurse=False):
            full = prefix + p_name
            norm_or_table = isinstance(mod, (nn.LayerNorm, nn.BatchNorm2d, nn.Embedding))
            if norm_or_table or p_name in (
                "bias",
                "pos_embed",
                "class_embedding",
                "logit_scale",
                "logit_bias",
            ):
                names.add(full)
    return names


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_no_weight_decay_is_exactly_gains_biases_embeddings_and_temperature(name):
    model = create_model(name)
    got = model.no_weight_decay()
    assert got == _expected_no_decay(model)
    # Every matrix of a Linear or convolution is decayed, the patch-embedding convolution included.
    assert "text.transformer.blocks.0.attn.qkv.weight" not in got
    assert not any(n.endswith(("proj", "proj.weight", "conv1.weight")) for n in got if "pos" not in n)
    if name == "tiny-vit":
        assert "visual.patch_embed.weight" not in got


# ------------------------------------------------------------------------------------------ image tower


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_vit_mask_ratio_keeps_a_random_subset(ratio):
    model = create_model("tiny-vit").eval()
    images = _images(model, 3)
    T = model.config.vision.grid_size**2
    seen = []
    handle = model.visual.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        model.encode_image(images)
        model.encode_image(images, mask_ratio=ratio)
    handle.remove()
    full, masked = seen
    assert full.shape[1] == 1 + T
    assert masked.shape[1] == 1 + round(T * (1 - ratio))
    # Each kept token (after ln_pre) is one of the unmasked sequence's patch tokens, none twice,
    # and the class token stays first.
    torch.testing.assert_close(masked[:, 0], full[:, 0])
    for i in range(images.shape[0]):
        match = torch.cdist(masked[i, 1:], full[i, 1:]).argmin(dim=1)
        torch.testing.assert_close(masked[i, 1:], full[i, 1:][match])
        assert len(set(match.tolist())) == masked.shape[1] - 1


def test_vit_mask_ratio_zero_is_plain_forward():
    model = create_model("tiny-vit").eval()
    images = _images(model, 2)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images, mask_ratio=0.0), model.encode_image(images))


def test_resnet_rejects_masking():
    model = create_model("tiny-rn")
    with pytest.raises(ValueError, match="ViT"):
        model.encode_image(_images(model, 1), mask_ratio=0.5)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_wrong_image_size_is_a_clear_error(name):
    model = create_model(name)
    size = model.config.vision.image_size
    with pytest.raises(ValueError, match=rf"image.*{size}"):
        model.encode_image(torch.randn(1, 3, size + 32, size + 32))
