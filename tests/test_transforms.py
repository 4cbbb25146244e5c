"""Preprocessing against straightforward references that follow torchvision's documented rules.

torchvision cannot be installed here, so the references below re-derive OpenAI's `_transform(n)`
(Resize(n, BICUBIC) -> CenterCrop(n) -> convert("RGB") -> ToTensor -> Normalize) in numpy, in the
shape of torchvision's own PIL code: `resize` keeps the image when the short side already equals n,
else sets the long side to int(n * long / short); CenterCrop takes top = int(round((h - n) / 2.0)).
"""

import io
import json
import math
import pickle

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from clipforge.transforms import (
    OPENAI_MEAN,
    OPENAI_STD,
    ImageLoadError,
    PreprocessConfig,
    eval_transform,
    load_image,
    train_transform,
)

MEAN = np.array(OPENAI_MEAN)[:, None, None]
STD = np.array(OPENAI_STD)[:, None, None]


# ---------------------------------------------------------------------------------------------------
# references


def ref_resize(img, size):
    """torchvision.transforms.functional.resize(img, int) for PIL (pre-v2 code path)."""
    w, h = img.size
    if (w <= h and w == size) or (h <= w and h == size):
        return img
    if w < h:
        return img.resize((size, int(size * h / w)), Image.BICUBIC)
    return img.resize((int(size * w / h), size), Image.BICUBIC)


def ref_eval_uint8(img, n):
    """OpenAI's pipeline up to ToTensor, as a (n, n, 3) uint8 array."""
    r = ref_resize(img, n)
    arr = np.asarray(r)
    h, w = arr.shape[:2]
    top, left = round((h - n) / 2.0), round((w - n) / 2.0)
    crop = Image.fromarray(np.ascontiguousarray(arr[top : top + n, left : left + n]), mode=r.mode)
    return np.asarray(crop.convert("RGB"))


def normalise(uint8_hwc):
    return (uint8_hwc.transpose(2, 0, 1).astype(np.float64) / 255.0 - MEAN) / STD


def to_uint8(x):
    """Undo Normalize and ToTensor: (3, H, W) float -> (H, W, 3) uint8."""
    return np.rint((x.double().numpy() * STD + MEAN) * 255).astype(np.int64).transpose(1, 2, 0)


def assert_matches(out, expected_uint8):
    assert out.dtype == torch.float32 and out.shape == (3, *expected_uint8.shape[:2])
    np.testing.assert_array_equal(to_uint8(out), expected_uint8)  # same pixels (1/255 would be +-1)
    np.testing.assert_allclose(out.double().numpy(), normalise(expected_uint8), atol=1e-5, rtol=0)


def photos():
    imgs = {f"sklearn{i}": a for i, a in enumerate(load_sample_images().images)}
    for name in ("astronaut", "camera", "coffee", "chelsea"):
        imgs[name] = getattr(skimage.data, name)()
    return {k: Image.fromarray(v) for k, v in imgs.items()}


PHOTOS = photos()


def noise(h, w, c=3, seed=0):
    shape = (h, w, c) if c > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------
# eval transform


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("n", [224, 336, 64])
def test_eval_matches_openai_reference_on_photos(name, n):
    img = PHOTOS[name]
    assert_matches(eval_transform(n)(img), ref_eval_uint8(img, n))


@pytest.mark.parametrize(
    "h,w,n",
    [
        (1, 1, 224),
        (3, 500, 224),
        (500, 3, 64),
        (1, 1000, 224),
        (1000, 1, 32),
        (17, 31, 224),
        (225, 224, 224),
        (224, 224, 224),
        (225, 225, 224),
        (224, 300, 224),
        (301, 226, 224),
        (227, 224, 224),
        (1, 2, 7),
    ],
)
def test_eval_odd_sizes(h, w, n):
    img = Image.fromarray(noise(h, w))
    assert_matches(eval_transform(n)(img), ref_eval_uint8(img, n))


def test_center_crop_rounding_is_pythons_round():
    # 227 - 224 = 3 -> round(1.5) = 2, 229 - 224 = 5 -> round(2.5) = 2 (half to even, like torchvision)
    for extra, expected_start in [(3, 2), (5, 2), (1, 0), (2, 1), (7, 4)]:
        arr = np.zeros((8, 8 + extra, 3), np.uint8)
        arr[:, expected_start] = 255  # marks the first column the crop must keep
        for a in (arr, arr.transpose(1, 0, 2)):  # crop along the width, then along the height
            out = to_uint8(eval_transform(8)(Image.fromarray(np.ascontiguousarray(a))))
            first, rest = (out[:, 0], out[:, 1:]) if a is arr else (out[0], out[1:])
            assert first.min() == 255 and rest.max() == 0


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "CMYK"])
def test_eval_other_modes_follow_openai_order(mode):
    # OpenAI resizes the image in its own mode and converts to RGB after the crop.
    img = Image.fromarray(noise(50, 70, 4, seed=3), mode="RGBA").convert(mode)
    assert_matches(eval_transform(32)(img), ref_eval_uint8(img, 32))


def test_eval_16_bit_is_scaled_before_resizing():
    v = np.random.default_rng(1).integers(0, 65536, (40, 60), dtype=np.uint16)
    gray = np.rint(v / 257.0).astype(np.uint8)  # 65535 -> 255
    expected = ref_eval_uint8(Image.fromarray(gray).convert("RGB"), 24)
    assert_matches(eval_transform(24)(Image.fromarray(v)), expected)


def test_eval_palette_is_converted_before_resizing():
    # PIL would resize a "P" image with nearest neighbour; we resize its RGB colours with bicubic.
    img = Image.fromarray(noise(40, 60, seed=4)).quantize(16)
    assert img.mode == "P"
    rgb = np.asarray(img.getpalette(), np.uint8).reshape(-1, 3)[np.asarray(img)]
    assert_matches(eval_transform(24)(img), ref_eval_uint8(Image.fromarray(rgb), 24))


def test_eval_custom_config_and_interpolation():
    cfg = PreprocessConfig(48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0), interpolation="bilinear")
    img = PHOTOS["coffee"]
    r = img.resize((int(48 * 600 / 400), 48), Image.BILINEAR)
    left = round((r.width - 48) / 2.0)
    expected = np.asarray(r)[:, left : left + 48].transpose(2, 0, 1) / 255.0
    expected = (expected - 0.5) / np.array([0.25, 0.5, 1.0])[:, None, None]
    np.testing.assert_allclose(eval_transform(cfg)(img).numpy(), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# load_image


def save(tmp_path, img, name, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_load_rgb_jpeg_and_fileobj(tmp_path):
    arr = np.asarray(PHOTOS["sklearn0"])
    path = save(tmp_path, PHOTOS["sklearn0"], "a.png")
    out = load_image(path)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), arr)
    np.testing.assert_array_equal(np.asarray(load_image(io.BytesIO(path.read_bytes()))), arr)
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), arr)


def test_load_grayscale_and_1bit(tmp_path):
    cam = skimage.data.camera()
    out = np.asarray(load_image(save(tmp_path, Image.fromarray(cam), "cam.png")))
    np.testing.assert_array_equal(out, np.repeat(cam[..., None], 3, axis=2))
    bits = noise(20, 30, 1) > 127
    out = np.asarray(load_image(save(tmp_path, Image.fromarray(bits), "bits.png")))
    np.testing.assert_array_equal(out, np.repeat(bits[..., None] * 255, 3, axis=2))


def test_load_palette_with_transparency(tmp_path):
    idx = np.random.default_rng(5).integers(0, 4, (30, 40), dtype=np.uint8)
    colours = np.array([[10, 20, 30], [200, 0, 0], [0, 200, 0], [0, 0, 200]], np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette(colours.flatten().tolist())
    path = save(tmp_path, img, "p.png", transparency=0)
    assert Image.open(path).info.get("transparency") == 0
    np.testing.assert_array_equal(np.asarray(load_image(path)), colours[idx])  # alpha dropped (OpenAI)
    on_white = colours[idx].copy()
    on_white[idx == 0] = 255
    np.testing.assert_array_equal(np.asarray(load_image(path, background=(255, 255, 255))), on_white)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_load_alpha(tmp_path, mode):
    rgba = noise(30, 40, 4, seed=6)
    img = Image.fromarray(rgba, mode="RGBA").convert(mode)
    colour = np.asarray(img)[..., :-1].astype(np.float64)
    alpha = np.asarray(img)[..., -1:].astype(np.float64) / 255
    colour = np.broadcast_to(colour, (30, 40, 3))
    path = save(tmp_path, img, "a.png")
    np.testing.assert_array_equal(np.asarray(load_image(path)), colour.astype(np.uint8))
    bg = np.array([255.0, 128.0, 0.0])
    composite = colour * alpha + bg * (1 - alpha)
    out = np.asarray(load_image(path, background=(255, 128, 0))).astype(np.float64)
    assert np.abs(out - composite).max() <= 1.0


@pytest.mark.parametrize("mode,ext", [("I;16", "png"), ("I", "tif")])
def test_load_16_bit_scales_not_clips(tmp_path, mode, ext):
    v = np.random.default_rng(7).integers(0, 65536, (30, 40)).astype(np.uint16)
    v[0, :3] = [0, 65535, 300]
    img = Image.fromarray(v)
    if mode == "I":
        img = img.convert("I")
    path = save(tmp_path, img, f"a.{ext}")
    assert Image.open(path).mode.startswith(mode)
    expected = np.rint(v / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.repeat(expected[..., None], 3, axis=2))


def test_load_float_tiff(tmp_path):
    v = np.random.default_rng(8).random((20, 30)).astype(np.float32)
    path = save(tmp_path, Image.fromarray(v, mode="F"), "f.tif")
    expected = np.rint(v.astype(np.float64) * 255).astype(np.uint8)
    assert np.abs(np.asarray(load_image(path))[..., 0].astype(int) - expected).max() <= 1


def test_load_cmyk(tmp_path):
    rgb = noise(30, 40, seed=9)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    tif = save(tmp_path, cmyk, "c.tif")
    np.testing.assert_array_equal(np.asarray(load_image(tif)), rgb)  # black = 0: exact round trip
    photo = np.asarray(PHOTOS["coffee"])
    jpg = save(tmp_path, PHOTOS["coffee"].convert("CMYK"), "c.jpg", quality=95)
    assert Image.open(jpg).mode == "CMYK"
    assert np.abs(np.asarray(load_image(jpg)).astype(int) - photo).mean() < 3


@pytest.mark.parametrize("orientation,k", [(6, -1), (8, 1), (3, 2)])
def test_load_exif_orientation(tmp_path, orientation, k):
    img = PHOTOS["coffee"].resize((60, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path, img, "r.jpg", exif=exif.tobytes(), quality=95)
    stored = np.asarray(Image.open(path).convert("RGB"))  # decoded pixels, not rotated
    # 6: display = stored turned 90 deg clockwise; 8: counter-clockwise; 3: 180 deg.
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.rot90(stored, k=k))


def test_truncated_jpeg_fails_with_name(tmp_path):
    path = save(tmp_path, PHOTOS["sklearn1"], "full.jpg", quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.jpg"):
        load_image(cut)


def test_non_image_missing_and_directory(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    with pytest.raises(ImageLoadError, match=r"notes\.txt"):
        load_image(txt)
    with pytest.raises(FileNotFoundError, match=r"nope\.jpg"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)
    assert issubclass(ImageLoadError, ValueError)


def test_decompression_bomb_guard(tmp_path):
    path = save(tmp_path, Image.fromarray(noise(20, 30)), "big.png")
    with pytest.raises(ImageLoadError, match=r"big\.png.*600 pixels.*max_pixels=599"):
        load_image(path, max_pixels=599)
    assert load_image(path, max_pixels=600).size == (30, 20)
    assert load_image(path, max_pixels=None).size == (30, 20)


# ---------------------------------------------------------------------------------------------------
# train transforms


def ref_random_resized_crop_params(width, height, scale, ratio):
    """torchvision RandomResizedCrop.get_params, with its torch RNG calls in the same order."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("mode", ["square_crop", "random_resized_crop"])
@pytest.mark.parametrize("size", [(1, 1), (3, 500), (427, 640), (512, 512)])
def test_train_shapes(mode, size):
    img = Image.fromarray(noise(*size))
    out = train_transform(32, mode=mode)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_square_crop_is_a_window_of_the_resized_image():
    img, n = PHOTOS["sklearn0"], 224  # 640 x 427 -> 335 x 224: 112 possible windows
    resized = np.asarray(ref_resize(img, n)).astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(resized, (n, n, 3))[0, :, 0]  # (112, n, n, 3)
    t = train_transform(n)
    lefts = set()
    for seed in range(5):
        torch.manual_seed(seed)
        out = to_uint8(t(img))
        hits = [j for j in range(windows.shape[0]) if np.array_equal(windows[j], out)]
        assert len(hits) == 1
        # torchvision RandomCrop.get_params draws top then left with torch.randint
        torch.manual_seed(seed)
        top = torch.randint(0, 1, size=(1,)).item()
        left = torch.randint(0, resized.shape[1] - n + 1, size=(1,)).item()
        assert (top, hits[0]) == (0, left)
        lefts.add(left)
    assert len(lefts) > 1


def test_square_crop_positions_are_uniform():
    img = Image.fromarray(np.tile(np.arange(30, dtype=np.uint8)[None, :, None] * 8, (10, 1, 3)))
    t = train_transform(PreprocessConfig(10, mean=(0, 0, 0), std=(1, 1, 1)), generator=torch.Generator())
    t.generator.manual_seed(0)
    lefts = [round(t(img)[0, 0, 0].item() * 255 / 8) for _ in range(2100)]  # column value = 8 * index
    counts = np.bincount(lefts, minlength=21)
    assert len(counts) == 21 and counts.min() > 60 and counts.max() < 145  # expected 100 each


# OpenCLIP's scale=(0.9, 1.0) finds no crop within the 3/4..4/3 ratio range on a 3:2 photo, so
# torchvision falls back to the central crop with the ratio clamped: (top, left, h, w) fixed.
@pytest.mark.parametrize(
    "size,scale,fallback",
    [
        ((500, 480), (0.9, 1.0), None),
        ((300, 451), (0.08, 1.0), None),
        ((427, 640), (0.9, 1.0), (0, 35, 427, 569)),
        ((1, 1000), (0.9, 1.0), (0, 499, 1, 1)),
    ],
)
def test_random_resized_crop_matches_torchvision_algorithm(size, scale, fallback):
    img, n = Image.fromarray(noise(*size, seed=2)), 48
    t = train_transform(n, mode="random_resized_crop", scale=scale)
    params = set()
    for seed in range(4):
        torch.manual_seed(seed)
        out = t(img)
        torch.manual_seed(seed)
        i, j, h, w = ref_random_resized_crop_params(img.width, img.height, scale, (3 / 4, 4 / 3))
        crop = Image.fromarray(np.ascontiguousarray(np.asarray(img)[i : i + h, j : j + w]))
        assert_matches(out, np.asarray(crop.resize((n, n), Image.BICUBIC)))
        params.add((i, j, h, w))
        if fallback is None:
            assert scale[0] - 0.01 <= h * w / (img.width * img.height) <= 1.0
            assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    assert params == {fallback} if fallback else len(params) == 4


def test_generator_determinism_and_pickling():
    # a 3:2 photo gives square_crop room to move; a square one keeps random_resized_crop off its fallback
    for mode, img in [("square_crop", PHOTOS["chelsea"]), ("random_resized_crop", PHOTOS["astronaut"])]:
        a = train_transform(64, mode=mode, generator=torch.Generator().manual_seed(1))
        b = pickle.loads(pickle.dumps(a))
        outs_a, outs_b = [a(img) for _ in range(3)], [b(img) for _ in range(3)]
        for x, y in zip(outs_a, outs_b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        assert not torch.equal(outs_a[0], outs_a[1]) or not torch.equal(outs_a[1], outs_a[2])
        c = train_transform(64, mode=mode, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(c(img), outs_a[0], rtol=0, atol=0)
    e = eval_transform(PreprocessConfig(40))
    torch.testing.assert_close(pickle.loads(pickle.dumps(e))(img), e(img), rtol=0, atol=0)


def test_train_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        train_transform(32, mode="flip")
    with pytest.raises(ValueError, match="scale"):
        train_transform(32, mode="random_resized_crop", scale=(0.0, 1.0))
    with pytest.raises(TypeError, match="PIL"):
        eval_transform(32)(torch.zeros(3, 32, 32))


# ---------------------------------------------------------------------------------------------------
# config


def test_preprocess_config_round_trip_and_errors():
    cfg = PreprocessConfig(336, interpolation="bilinear")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d == {
        "image_size": 336,
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "interpolation": "bilinear",
    }
    assert PreprocessConfig.from_dict(d) == cfg and hash(PreprocessConfig.from_dict(d)) == hash(cfg)
    with pytest.raises(ValueError, match="crop_pct"):
        PreprocessConfig.from_dict({**d, "crop_pct": 0.9})
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessConfig(224, interpolation="cubic")
    with pytest.raises(ValueError, match="image_size"):
        PreprocessConfig(0)
    assert eval_transform(224).config == PreprocessConfig(224)
