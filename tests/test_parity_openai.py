"""Parity with OpenAI's own reference code (clip/model.py, loaded by file path: `import clip` needs
torchvision): random-weight reference models, their state dicts and TorchScript archives loaded into
clipforge give the same features in fp32."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from clipforge.checkpoints import (
    convert_openai_to_clipforge,
    infer_config_from_openai,
    load,
    read_torchscript_state_dict,
)
from clipforge.models import CLIP
from helpers import openai_model_module

EOT = 49407


oai = openai_model_module()

# OpenAI CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
#             context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)
CONFIGS = {
    "tiny-vit": (32, 32, 2, 128, 8, 77, 49408, 128, 2, 2),
    "tiny-rn": (32, 64, (1, 2, 1, 1), 16, None, 77, 49408, 128, 2, 2),
    "ViT-B-32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
}


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Perturb every tensor so no entry is a constant (LayerNorm gains, biases, zero-init bn3, BN stats):
    a mapping error anywhere changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(int(torch.randint(1, 1000, (), generator=g)))
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point() and t.numel() > 1:
                t.add_(0.05 * torch.randn(t.shape, generator=g))
                if name.endswith("running_mean"):
                    t.mul_(0.1)


def reference_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = oai.CLIP(*CONFIGS[name])
    randomise_(model, seed)
    return model.eval()


def random_tokens(n: int, context: int = 77, seed: int = 0) -> torch.Tensor:
    """Random ids < EOT, SOT first, EOT at varied positions (the last at the very end), 0-padded."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, EOT - 1, (n, context), generator=g)
    tokens[:, 0] = EOT - 1
    ends = torch.linspace(1, context - 1, n).long()
    for i, e in enumerate(ends):
        tokens[i, e] = EOT
        tokens[i, e + 1 :] = 0
    return tokens


def diffs(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    abs_diff = (ours - ref).abs().max().item()
    return abs_diff, abs_diff / ref.abs().max().item()


def check_parity(model: CLIP, ref: torch.nn.Module, image_size: int, label: str, n: int = 5) -> None:
    pixels = torch.randn(min(n, 3), 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    tokens = random_tokens(n)
    with torch.no_grad():
        for what, ours, theirs in (
            ("image", model.encode_image(pixels), ref.encode_image(pixels)),
            ("text", model.encode_text(tokens), ref.encode_text(tokens)),
        ):
            assert ours.shape == theirs.shape
            abs_diff, rel = diffs(ours, theirs)
            print(f"{label} {what}: max abs diff {abs_diff:.2e}, rel {rel:.2e}")
            assert rel <= 1e-4, f"{label} {what}: relative max diff {rel:.2e} > 1e-4"


def from_reference(ref: torch.nn.Module) -> CLIP:
    sd = ref.state_dict()
    cfg = infer_config_from_openai(sd)
    with torch.device("meta"):  # no random init: every tensor is assigned below
        model = CLIP(cfg)
    model.load_state_dict(convert_openai_to_clipforge(sd), assign=True)
    return model.eval()


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_state_dict_parity(name):
    ref = reference_model(name)
    check_parity(from_reference(ref), ref, CONFIGS[name][1], name)


@pytest.mark.slow
def test_state_dict_parity_vit_b32():
    t0 = time.perf_counter()
    ref = reference_model("ViT-B-32")
    model = from_reference(ref)
    assert model.config.vision.heads == 12 and model.config.text.heads == 8
    check_parity(model, ref, 224, "ViT-B-32", n=3)
    print(f"ViT-B-32 parity took {time.perf_counter() - t0:.1f}s")


def test_plain_state_dict_file(tmp_path):
    """An OpenAI-layout .pt as OpenCLIP writes it (fp32) loads through clipforge.load, not fp16-rounded."""
    ref = reference_model("tiny-rn", seed=3)
    torch.save(ref.state_dict(), tmp_path / "rn.pt")
    model, preprocess, _ = load(tmp_path / "rn.pt")
    assert preprocess.image_size == 64
    check_parity(model, ref, 64, "tiny-rn .pt")


def make_torchscript_archive(ref: torch.nn.Module, path, image_size: int) -> None:
    """Save like OpenAI's published files: traced, fp16 weights, scalar entries next to them."""
    traced_src = copy.deepcopy(ref)
    del (
        traced_src.context_length,
        traced_src.vocab_size,
    )  # plain ints in the Python model: buffers in the archive
    for key, value in (("input_resolution", image_size), ("context_length", 77), ("vocab_size", 49408)):
        traced_src.register_buffer(key, torch.tensor(value))
    pixels, tokens = torch.randn(1, 3, image_size, image_size), random_tokens(1)
    traced = torch.jit.trace_module(
        traced_src,
        {"forward": (pixels, tokens), "encode_image": (pixels,), "encode_text": (tokens,)},
        check_trace=False,
    )
    torch.jit.save(traced.half(), str(path))


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_torchscript_archive(tmp_path, name):
    image_size = CONFIGS[name][1]
    ref = reference_model(name, seed=5)
    path = tmp_path / f"{name}.pt"
    make_torchscript_archive(ref, path, image_size)

    # The archive reader (which runs nothing) sees exactly what TorchScript itself loads.
    ours = read_torchscript_state_dict(path)
    theirs = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    assert (
        ours["visual.proj" if name == "tiny-vit" else "visual.attnpool.c_proj.weight"].dtype == torch.float16
    )

    model, preprocess, tokenizer = load(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert preprocess.image_size == image_size
    if tokenizer is not None:
        assert tokenizer.vocab_size == 49408
    # Reference: the same fp16-rounded weights, computed in fp32.
    rounded = copy.deepcopy(ref)
    with torch.no_grad():
        for t in rounded.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    check_parity(model, rounded, image_size, f"{name} TorchScript")
