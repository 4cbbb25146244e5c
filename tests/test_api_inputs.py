"""What a notebook user hands the library API: wrong inputs get a one-line error naming the fix, never a
torch internal (IndexError, AttributeError) or a silently wrong result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipforge import create_model


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_model("tiny-vit").eval()


def _pixels(model, n: int = 1) -> torch.Tensor:
    s = model.config.vision.image_size
    return torch.randn(n, 3, s, s)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (lambda x: x[0], ValueError, r"batch.*unsqueeze\(0\)"),  # one image, no batch dimension
        (lambda x: x.permute(0, 2, 3, 1), ValueError, "channels first"),
        (lambda x: (x * 60 + 120).clamp(0, 255).to(torch.uint8), TypeError, "float pixels.*uint8"),
        (lambda x: x.numpy(), TypeError, "float tensor.*ndarray"),
    ],
    ids=["3d", "channels-last", "uint8", "numpy"],
)
def test_encode_image_refuses_what_it_cannot_take(vit, bad, error, match):
    with pytest.raises(error, match=match):
        vit.encode_image(bad(_pixels(vit)))


def test_encode_image_keeps_empty_batches_and_float_dtypes(vit):
    assert vit.encode_image(_pixels(vit, 0)).shape == (0, vit.config.embed_dim)
    x = _pixels(vit, 2)
    with torch.inference_mode():
        torch.testing.assert_close(vit.encode_image(x.double()), vit.encode_image(x))


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ("a dog", TypeError, r"tokenize the texts first"),
        (["a dog"], TypeError, r"tokenize the texts first"),
        (torch.ones(1, 5), TypeError, "integer token ids, got torch.float32"),
        (torch.tensor([[1, 60000, 2]]), ValueError, r"token id 60000 .*vocabulary \(0\.\.49407\)"),
        (torch.tensor([[1, -3, 2]]), ValueError, r"token id -3 .*vocabulary"),
    ],
    ids=["str", "list", "float", "past-vocab", "negative"],
)
def test_encode_text_refuses_what_it_cannot_take(vit, bad, error, match):
    with pytest.raises(error, match=match):
        vit.encode_text(bad)


def test_encode_text_takes_int32_ids(vit):
    ids = torch.tensor([[49406, 320, 1929, 49407, 0]])
    with torch.inference_mode():
        torch.testing.assert_close(vit.encode_text(ids.int()), vit.encode_text(ids))
    assert vit.encode_text(ids[:0]).shape == (0, vit.config.embed_dim)


def test_normalize_keyword_as_open_clip(vit):
    """OpenCLIP's encode_image(x, normalize=True) / encode_text(t, True): unit rows, same direction."""
    x, ids = _pixels(vit, 3), torch.tensor([[49406, 320, 1929, 49407, 0], [49406, 539, 49407, 0, 0]])
    with torch.inference_mode():
        for plain, unit in [
            (vit.encode_image(x), vit.encode_image(x, normalize=True)),
            (vit.encode_image(x), vit.encode_image(x, True)),  # positional, as OpenCLIP code calls it
            (vit.encode_text(ids), vit.encode_text(ids, normalize=True)),
        ]:
            torch.testing.assert_close(unit.norm(dim=-1), torch.ones(len(unit)))
            torch.testing.assert_close(unit * plain.norm(dim=-1, keepdim=True), plain)
            assert not torch.allclose(plain.norm(dim=-1), torch.ones(len(plain)))


# ------------------------------------------------------------------ clipforge.use and eval: text and paths
@pytest.fixture(scope="module")
def encoder(vit):
    from clipforge.use import open_encoder

    return open_encoder(vit)


def test_encode_texts_takes_one_string_generators_and_arrays(encoder):
    ref = encoder.encode_texts(["a dog", "a cat"])
    assert encoder.encode_texts("a dog").shape == (1, ref.shape[1])  # one text, not one per character
    torch.testing.assert_close(encoder.encode_texts("a dog"), ref[:1])
    torch.testing.assert_close(encoder.encode_texts(t for t in ["a dog", "a cat"]), ref)
    torch.testing.assert_close(encoder.encode_texts(np.array(["a dog", "a cat"])), ref)


def test_eval_encode_texts_takes_one_string(vit, encoder):
    from clipforge.eval import encode_texts

    assert encode_texts(vit, encoder.tokenizer, "a dog").shape == (1, vit.config.embed_dim)


def test_a_single_string_is_not_a_list_of_labels(vit, encoder):
    from clipforge.eval import zero_shot_classifier
    from clipforge.use.classify import Classifier

    with pytest.raises(TypeError, match=r"labels: .*single string 'a cat'"):
        Classifier(encoder, "a cat")
    with pytest.raises(TypeError, match=r"classnames: .*single string 'cat'"):
        zero_shot_classifier(vit, encoder.tokenizer, "cat", ["a photo of a {}."])


def test_one_template_string_is_one_template(vit, encoder):
    from clipforge.eval import zero_shot_classifier
    from clipforge.use.classify import Classifier

    ref = Classifier(encoder, ["a cat", "a dog"], templates=["a photo of {}."]).weights
    torch.testing.assert_close(
        Classifier(encoder, ["a cat", "a dog"], templates="a photo of {}.").weights, ref
    )
    w = zero_shot_classifier(vit, encoder.tokenizer, iter(["cat", "dog"]), "a photo of a {}.")
    torch.testing.assert_close(
        w, zero_shot_classifier(vit, encoder.tokenizer, ["cat", "dog"], ["a photo of a {}."])
    )


def test_classify_and_score_take_paths_not_images(tmp_path, encoder):
    from PIL import Image

    from clipforge.use.classify import Classifier, clip_score

    path = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(path)
    clf = Classifier(encoder, ["a cat", "a dog"])
    results, skipped = clf.classify(str(path), top_k=1)  # one path: one result, not one per character
    assert [r["path"] for r in results] == [str(path)] and skipped == []
    assert clf.classify(p for p in [path])[0][0]["path"] == str(path)
    scores = clip_score(encoder, (p for p in [path]), "a red square")
    assert scores["count"] == 1 and scores["pairs"][0]["caption"] == "a red square"
    with pytest.raises(TypeError, match=r"images\[0\] is a PngImageFile.*encode_pixels"):
        clf.classify([Image.open(path)])
    with pytest.raises(TypeError, match=r"images\[0\] is a ndarray"):
        clip_score(encoder, [np.zeros((4, 4, 3), np.uint8)], ["x"])
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        clf.classify([path], top_k=0)


# ------------------------------------------------------------------ the caller's model is left as it was
def test_open_encoder_leaves_the_callers_model_in_its_mode():
    from clipforge.use import open_encoder

    torch.manual_seed(0)
    model = create_model("tiny-rn").train()
    model.visual.layer1.eval()  # a locked part (LiT) stays in eval mode while the rest trains
    s = model.config.vision.image_size
    x = torch.randn(2, 3, s, s)
    enc = open_encoder(model)
    feats = enc.encode_pixels(x)
    assert model.training and not model.visual.layer1.training
    assert model.visual.bn1.training and not enc.encode_pixels(x).requires_grad
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.eval().encode_image(x), dim=-1)  # BatchNorm statistics
    torch.testing.assert_close(feats, ref)


def test_export_onnx_leaves_the_callers_model_where_it_was(tmp_path):
    pytest.importorskip("onnx")
    from clipforge.use.onnx_export import export_onnx

    model = create_model("tiny-vit").train().to(torch.float64)
    export_onnx(model, tmp_path / "onnx")
    assert model.training and model.logit_scale.dtype == torch.float64


def test_linear_probe_takes_numpy_features():
    from clipforge.eval import linear_probe

    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 4
    x = torch.randn(40, 8, generator=g) + 3 * torch.nn.functional.one_hot(y, 8).float()
    ref = linear_probe(x, y, x, y, lam=1e-3)
    res = linear_probe(x.numpy(), y.numpy(), x.numpy(), y.numpy(), lam=1e-3)
    torch.testing.assert_close(res.weight, ref.weight)
    assert res.metrics == ref.metrics
