"""What a notebook user hands the library API: wrong inputs get a one-line error naming the fix, never a
torch internal (IndexError, AttributeError) or a silently wrong result."""

from __future__ import annotations

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
