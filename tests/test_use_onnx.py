"""export-onnx: two graphs with dynamic batch (and text length), parity with onnxruntime (CPU provider)
<= 1e-4 relative for a tiny ViT, a tiny ResNet and (slow) ViT-B-32; embed --runtime onnx."""

import json

import numpy as np
import pytest
import torch

from clipforge import create_model
from clipforge.use import EmbedOptions, embed, open_encoder
from clipforge.use.onnx_export import export_onnx
from use_helpers import tiny_checkpoint, write_images

pytest.importorskip("onnxruntime")


def tokens_batch(n, ctx, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(n, ctx, dtype=torch.long)
    for i in range(n):
        length = 2 + (i * 7) % (ctx - 2)
        t[i, 0] = vocab - 2
        t[i, 1:length] = torch.randint(1, vocab - 2, (length - 1,), generator=g)
        t[i, length] = vocab - 1
    return t


def check_parity(model, tmp_path, batch=5, normalize=False):
    spec = export_onnx(model, tmp_path / "onnx", normalize=normalize)
    enc = open_encoder(tmp_path / "onnx", runtime="onnx")
    s, ctx, vocab = (
        model.config.vision.image_size,
        model.config.text.context_length,
        model.config.text.vocab_size,
    )
    pixels = torch.randn(batch, 3, s, s)
    tokens = tokens_batch(batch, ctx, vocab)
    with torch.no_grad():
        ref_i, ref_t = model.encode_image(pixels), model.encode_text(tokens)
    if normalize:
        ref_i, ref_t = (
            torch.nn.functional.normalize(ref_i, dim=-1),
            torch.nn.functional.normalize(ref_t, dim=-1),
        )
    got_i = torch.from_numpy(enc.visual.run(None, {"pixels": pixels.numpy()})[0])
    got_t = torch.from_numpy(enc.textual.run(None, {"tokens": tokens.numpy()})[0])
    for got, ref in ((got_i, ref_i), (got_t, ref_t)):
        assert got.shape == ref.shape
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        assert rel <= 1e-4, rel
    # a shorter text length also runs (the EOT pooling is inside the graph)
    short = tokens[:, :20].clone()
    short[:, -1] = torch.where(tokens.argmax(-1) >= 19, vocab - 1, short[:, -1])
    got_s = enc.textual.run(None, {"tokens": short.numpy()})[0]
    with torch.no_grad():
        ref_s = model.encode_text(short)
        ref_s = torch.nn.functional.normalize(ref_s, dim=-1) if normalize else ref_s
    np.testing.assert_allclose(got_s, ref_s.numpy(), atol=1e-4 * ref_s.abs().max().item())
    return spec


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-rn"])
def test_parity_tiny(preset, tmp_path):
    torch.manual_seed(0)
    model = create_model(preset).eval()
    spec = check_parity(model, tmp_path)
    assert spec["embed_dim"] == 32 and spec["vision_kind"] == ("vit" if preset == "tiny-vit" else "resnet")
    assert (tmp_path / "onnx" / "vocab.json").is_file()


def test_normalized_export(tmp_path):
    torch.manual_seed(0)
    check_parity(create_model("tiny-vit").eval(), tmp_path, batch=3, normalize=True)


@pytest.mark.slow
def test_parity_vit_b_32(tmp_path):
    torch.manual_seed(0)
    check_parity(create_model("ViT-B-32").eval(), tmp_path, batch=2)


def test_embed_with_onnx_runtime_matches_torch(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    export_onnx(ckpt, tmp_path / "onnx")
    spec = json.loads((tmp_path / "onnx" / "clipforge_onnx.json").read_text())
    assert spec["fingerprint"] == open_encoder(ckpt).fingerprint
    write_images(tmp_path / "photos", 6)
    opts = EmbedOptions(progress=False, dtype="float32", modality="both")
    a = embed(tmp_path / "photos", tmp_path / "torch", ckpt, options=opts)
    b = embed(tmp_path / "photos", tmp_path / "onnx_emb", tmp_path / "onnx", runtime="onnx", options=opts)
    assert b["model"]["runtime"] == "onnx" and a["count"] == b["count"] == 6
    for sub in ("img_emb", "text_emb"):
        x = np.load(tmp_path / "torch" / sub / "part-00000.npy")
        y = np.load(tmp_path / "onnx_emb" / sub / "part-00000.npy")
        np.testing.assert_allclose(x, y, atol=1e-5)
