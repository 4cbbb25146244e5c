"""Parity with HF transformers' CLIPModel (random weights): HF -> clipforge and clipforge -> HF
directories give the same image and text features in fp32."""

from __future__ import annotations

import json

import pytest
import torch

from clipforge.checkpoints import config_from_hf, config_to_hf, load, save_hf
from clipforge.config import PRESETS
from clipforge.models import CLIP

transformers = pytest.importorskip("transformers")

EOT = 49407
TOL = 1e-5

HF_CONFIGS = {
    "tiny": dict(
        projection_dim=32,
        text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
        vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=8),
    ),
    "ViT-B-32": dict(
        projection_dim=512,
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=32),
    ),
}  # fmt: skip


def hf_config(name: str, act: str = "quick_gelu"):
    c = HF_CONFIGS[name]
    return transformers.CLIPConfig(
        text_config=dict(
            vocab_size=49408, max_position_embeddings=77, hidden_act=act,
            bos_token_id=49406, eos_token_id=EOT, **c["text"],
        ),
        vision_config=dict(hidden_act=act, **c["vision"]),
        projection_dim=c["projection_dim"],
    )  # fmt: skip


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Perturb every tensor (LayerNorm gains and biases included) so any mapping error shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))


def random_tokens(n: int, seed: int = 0) -> torch.Tensor:
    """SOT, random ids, EOT at varied positions; rows alternate 0-padding (OpenAI) and EOT-padding (HF)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, EOT - 1, (n, 77), generator=g)
    tokens[:, 0] = EOT - 1
    for i, e in enumerate(torch.linspace(1, 76, n).long().tolist()):
        tokens[i, e:] = EOT
        if i % 2 == 0:
            tokens[i, e + 1 :] = 0
    return tokens


def features(out) -> torch.Tensor:
    """transformers 4 returns a tensor; transformers 5 an output whose pooler_output is the projection."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def compare(hf_model, ours: CLIP, image_size: int, label: str, n: int = 6) -> None:
    pixels = torch.randn(min(n, 3), 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    tokens = random_tokens(n)
    with torch.no_grad():
        pairs = (
            ("image", ours.encode_image(pixels), features(hf_model.get_image_features(pixel_values=pixels))),
            ("text", ours.encode_text(tokens), features(hf_model.get_text_features(input_ids=tokens))),
        )
    for what, a, b in pairs:
        assert a.shape == b.shape
        abs_diff = (a - b).abs().max().item()
        rel = abs_diff / b.abs().max().item()
        print(f"HF {label} {what}: max abs diff {abs_diff:.2e}, rel {rel:.2e}, max|f| {b.abs().max():.1f}")
        assert abs_diff <= TOL * max(1.0, b.abs().max().item()), (
            f"{label} {what}: max abs diff {abs_diff:.2e}"
        )


def hf_from_pretrained(path):
    model, info = transformers.CLIPModel.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_to_clipforge_tiny(tmp_path, act):
    torch.manual_seed(0)
    hf = transformers.CLIPModel(hf_config("tiny", act)).eval()
    randomise_(hf, 0)
    hf.save_pretrained(tmp_path)
    ours, preprocess, _ = load(tmp_path)
    assert ours.config.vision.act == act and ours.config.text.act == act
    assert preprocess.image_size == 32
    compare(hf, ours, 32, f"tiny {act} HF->clipforge")


def test_clipforge_to_hf_tiny(tmp_path):
    torch.manual_seed(1)
    ours = CLIP(PRESETS["tiny-vit"]).eval()
    randomise_(ours, 1)
    save_hf(ours, tmp_path / "hf")
    hf = hf_from_pretrained(tmp_path / "hf")
    compare(hf, ours, 32, "tiny clipforge->HF")


@pytest.mark.slow
def test_vit_b32_both_ways(tmp_path):
    """HF ViT-B/32 -> clipforge (features match) -> HF again (every tensor comes back bit-exact, so the
    re-exported HF model's features are those just compared)."""
    torch.manual_seed(2)
    hf = transformers.CLIPModel(hf_config("ViT-B-32")).eval()
    randomise_(hf, 2)
    hf.save_pretrained(tmp_path / "a")
    ours, _, _ = load(tmp_path / "a")
    assert ours.config.vision == PRESETS["ViT-B-32"].vision and ours.config.text == PRESETS["ViT-B-32"].text
    compare(hf, ours, 224, "ViT-B-32 HF->clipforge", n=3)
    save_hf(ours, tmp_path / "b")
    back = hf_from_pretrained(tmp_path / "b")
    original = hf.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_config_round_trip():
    for name in ("tiny-vit", "ViT-B-32", "ViT-L-14-336"):
        cfg = PRESETS[name]
        assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg
    hf_dict = hf_config("tiny").to_dict()
    cfg = config_from_hf(hf_dict)
    assert (cfg.vision.width, cfg.vision.heads, cfg.text.width, cfg.embed_dim) == (64, 2, 64, 32)


def test_config_errors():
    hf_dict = hf_config("tiny").to_dict()
    hf_dict["text_config"]["eos_token_id"] = 7
    with pytest.raises(ValueError, match="eos_token_id"):
        config_from_hf(hf_dict)
    hf_dict = hf_config("tiny", act="relu").to_dict()
    with pytest.raises(ValueError, match="relu"):
        config_from_hf(hf_dict)
    with pytest.raises(ValueError, match="ResNet"):
        config_to_hf(PRESETS["tiny-rn"])
