"""The fast training path (transforms.FastTrainTransform): the exact path's crops within a stated pixel
tolerance, the same random draws, reduced-scale JPEG decoding actually used, the torch resize computing
PIL's filter on PIL's crop geometry, uint8 batches normalised by the step exactly as the float path,
corrupt images counted in a shard stream, and the per-sample seeding the streams use."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

import clipforge.transforms as transforms
from clipforge.data.drawing import photo_like
from clipforge.data.seeding import forked_rng
from clipforge.models import create_model
from clipforge.train.step import contrastive_step
from clipforge.transforms import (
    OPENAI_MEAN,
    OPENAI_STD,
    EncodedImage,
    ImageLoadError,
    fast_train_transform,
    load_image,
    normalise_uint8,
    train_transform,
)
from helpers import random_batch

# Bounds over 6 photo-like 400-800 px JPEGs (quality 90), per image: mean absolute difference in 0-255
# levels and PSNR against the exact path's crop (FastTrainTransform's docstring states them). Measured
# worst cases: 64 px 3.5 / 33.8 dB (1/4-scale decode), 224 px 1.9 / 38.4 dB (1/2-scale decode).
TOLERANCE = {64: (4.5, 31.0), 224: (2.5, 35.0)}


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [_jpeg(photo_like(int(rng.integers(400, 800)), int(rng.integers(400, 800)), i)) for i in range(6)]


def _levels(x: torch.Tensor) -> torch.Tensor:
    """An exact-path tensor (normalised float) back in 0-255 levels."""
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (x * std + mean) * 255


def _diff(exact: torch.Tensor, fast: torch.Tensor) -> tuple[float, float]:
    d = _levels(exact) - fast.float()
    return float(d.abs().mean()), float(10 * torch.log10(255**2 / (d**2).mean()))


@pytest.mark.parametrize("mode", ["square_crop", "random_resized_crop"])
@pytest.mark.parametrize("size", [64, 224])
def test_fast_crops_match_exact_within_tolerance(photos, mode, size, monkeypatch):
    scales = []
    original = JpegImageFile.draft

    def spy(self, m, req):  # record the DCT scale the decoder was set to
        before = self.size[0]
        out = original(self, m, req)
        scales.append(round(before / self.size[0]))
        return out

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    exact, fast = train_transform(size, mode=mode), fast_train_transform(size, mode=mode)
    mad_max, psnr_min = TOLERANCE[size]
    for i, data in enumerate(photos):
        torch.manual_seed(i)
        a = exact(load_image(io.BytesIO(data)))
        after_exact = torch.rand(1)
        torch.manual_seed(i)
        b = fast(EncodedImage(data, f"photo{i}.jpg"))
        assert torch.rand(1) == after_exact  # the same random draws, in the same number
        assert b.dtype == torch.uint8 and b.shape == (3, size, size)
        mad, psnr = _diff(a, b)
        assert mad <= mad_max and psnr >= psnr_min, (i, mad, psnr)
    assert scales and max(scales) >= 2  # reduced-scale decoding was used, so the bound is a real one


def test_fast_on_decoded_images_is_nearly_exact(photos):
    """PIL images (manifest/folder sources): no reduced decode, only the box resize and uint8 output."""
    for mode in ("square_crop", "random_resized_crop"):
        for i, data in enumerate(photos[:3]):
            img = load_image(io.BytesIO(data))
            torch.manual_seed(i)
            a = train_transform(224, mode=mode)(img)
            torch.manual_seed(i)
            b = fast_train_transform(224, mode=mode)(img)
            mad, psnr = _diff(a, b)
            assert mad < 0.8 and psnr > 42, (mode, i, mad, psnr)


def test_fast_follows_exif_orientation(photos):
    img = photo_like(640, 420, 7)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _jpeg(img, exif=exif.tobytes())
    torch.manual_seed(0)
    a = train_transform(224)(load_image(io.BytesIO(data)))  # upright: 420 wide, 640 high
    torch.manual_seed(0)
    b = fast_train_transform(224)(EncodedImage(data, "turned.jpg"))
    mad, psnr = _diff(a, b)
    assert mad <= 2.5 and psnr >= 35, (mad, psnr)


def test_fast_decode_errors_name_the_image(photos):
    with pytest.raises(ImageLoadError, match=r"shard\.tar:k1\.jpg"):
        fast_train_transform(64)(EncodedImage(photos[0][:2000], "shard.tar:k1.jpg"))
    with pytest.raises(ImageLoadError, match=r"shard\.tar:k2\.jpg"):
        fast_train_transform(64)(EncodedImage(b"not an image", "shard.tar:k2.jpg"))


def test_uint8_batches_give_the_float_step():
    """The step normalises uint8 images on the device: same loss and gradients as normalised floats."""
    torch.manual_seed(0)
    model = create_model("tiny-vit")
    size = model.config.vision.image_size
    _, texts = random_batch(4, size, model.config.text.vocab_size)
    pixels = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    grads = []
    for images, norm in ((normalise_uint8(pixels, mean, std), (mean, std)), (pixels, (mean, std))):
        model.zero_grad()
        loss = contrastive_step(model, images, texts, pixel_norm=norm).loss
        grads.append((loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert grads[0][0] == grads[1][0]
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_shard_stream_with_fast_transform(photos, tmp_path):
    """WebDataset shards through the fast transform: uint8 batches, the same crops as the exact path's
    stream within tolerance, a corrupt JPEG counted (not fatal)."""
    from clipforge.data import write_shards
    from clipforge.data.pairs import PairRecord
    from clipforge.data.sources import StreamOptions, open_source

    files = []
    for i, data in enumerate([photos[4][:3000], *photos[:4]]):  # the first one cut short
        (tmp_path / f"{i}.jpg").write_bytes(data)
        files.append(PairRecord(tmp_path / f"{i}.jpg", (f"photo {i}",)))
    write_shards(files, tmp_path / "shards", verify=False, progress=False)

    def batches(transform):
        source = open_source("webdataset", {"train": str(tmp_path / "shards"), "shuffle": False})
        data = source.dataset(transform, lambda t, **kw: torch.zeros(len(t), 4, dtype=torch.long), 4)
        return next(iter(source.stream(data, StreamOptions(batch_size=4)))), source.skips

    fast, skips = batches(fast_train_transform(64))
    exact, _ = batches(train_transform(64))
    assert fast["image"].dtype == torch.uint8 and fast["image"].shape == (4, 3, 64, 64)
    for a, b in zip(exact["image"], fast["image"]):
        mad, psnr = _diff(a, b)
        assert mad <= TOLERANCE[64][0] and psnr >= TOLERANCE[64][1]
    assert skips.counts().get("corrupt_image") == 1


def test_trainer_with_fast_decode_trains_on_uint8_batches(photos, tmp_path):
    """data.fast_decode=true end to end: build_trainer picks the fast transform, the stream gives uint8
    batches and the step normalises them with the model's preprocessing (build.py's pixel_norm)."""
    from clipforge.data import write_shards
    from clipforge.data.pairs import PairRecord
    from clipforge.train.build import build_trainer
    from clipforge.train.experiment import load_experiment

    files = []
    for i, data in enumerate(photos[:4] * 2):
        (tmp_path / f"{i}.jpg").write_bytes(data)
        files.append(PairRecord(tmp_path / f"{i}.jpg", (f"photo {i}",)))
    write_shards(files, tmp_path / "shards", verify=False, progress=False)
    overrides = [
        "model.preset=tiny-vit", "data.kind=webdataset", f"data.train={tmp_path / 'shards'}",
        "data.fast_decode=true", "data.shuffle_buffer=4", "train.batch_size=4", "train.steps=2",
        "train.device=cpu", f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false",
    ]  # fmt: skip
    built = build_trainer(load_experiment(None, overrides), progress=False)
    batch = next(iter(built.data))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 32, 32)
    loss, applied = built.trainer.train_step(batch)
    assert applied and np.isfinite(loss)


def _pil_box(img: Image.Image, box, n: int, resample=Image.Resampling.BICUBIC) -> torch.Tensor:
    return torch.from_numpy(np.array(img.resize((n, n), resample, box=box))).permute(2, 0, 1).int()


def test_resize_plan_keeps_pils_crop_geometry():
    """torch's kernel starts on a whole pixel; the plan's margin puts output m + i on PIL's centre for
    output i to within half a pixel (median ~0.05), with the filter's support inside the region read."""
    rng = np.random.default_rng(0)
    shifts = []
    for _ in range(3000):
        n = int(rng.choice([64, 224, 336]))
        length = int(rng.integers(n, 4 * n))
        span = float(rng.uniform(n, length))
        a0 = 0.0 if rng.random() < 0.1 else float(rng.uniform(0, length - span))
        start, end, pad, m, s = transforms._resize_plan(a0, a0 + span, length, n)
        assert s == pytest.approx(span / n) and pad >= 0 and (pad == 0 or start == 0)
        shift = abs(start - pad + m * s - a0)  # where output m's centre falls, against PIL's output 0
        assert shift <= 0.5 + 1e-9
        assert m >= 2 or (a0 == 0 and shift == 0)  # a margin, or the image's first pixel (PIL clamps too)
        assert end == length or end >= start - pad + (m + n + 2) * s  # the last output's support is read
        shifts.append(shift)
    assert np.median(shifts) < 0.1


@pytest.mark.parametrize(
    "box",
    [
        (0.0, 0.0, 520.0, 440.0),  # the whole image: no margin
        (3.0, 0.0, 339.0, 336.0),  # x needs a margin (2 outputs at s = 1.5)
        (0.5, 1.75, 280.5, 281.75),  # margins before the first pixel: edge-padded
        (100.0, 90.0, 436.0, 426.0),
        (0.0, 0.0, 224.0, 224.0),  # no resize at all
    ],
)
@pytest.mark.parametrize("interpolation, mean_max", [("bicubic", 0.01), ("bilinear", 0.1)])
def test_torch_resize_is_pils_filter(box, interpolation, mean_max):
    """Where the plan's shift is zero, the torch path gives PIL's `resize(box=...)` to within the weight
    rounding: at most 2 levels, the mean under 0.01 (bicubic, the default) or 0.1 (bilinear), edge-padded
    starts included (where PIL clamps the filter instead)."""
    if transforms._torch_aa_kernel(interpolation) is None:
        pytest.skip("this torch has no antialiased uint8 resize (the fast path uses PIL)")
    img = photo_like(520, 440, 3)
    fast = transforms.FastTrainTransform(transforms.PreprocessConfig(224, interpolation=interpolation))
    out = fast.crop_resize(img, box)
    assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)
    d = (out.int() - _pil_box(img, box, 224, transforms.INTERPOLATIONS[interpolation])).abs()
    assert d.max() <= 2 and d.float().mean() < mean_max, (d.max(), d.float().mean())


def test_pil_resize_where_torch_does_not_apply():
    """Other filters, and crops smaller than S (enlarged), are resized by PIL itself: identical pixels."""
    img = photo_like(300, 260, 5)
    lanczos = transforms.FastTrainTransform(transforms.PreprocessConfig(64, interpolation="lanczos"))
    box = (10.5, 3.25, 250.5, 200.0)
    assert torch.equal(lanczos.crop_resize(img, box).int(), _pil_box(img, box, 64, Image.Resampling.LANCZOS))
    small = (20.0, 30.5, 120.0, 180.0)  # 100 x 150 pixels to 224 x 224
    assert torch.equal(fast_train_transform(224).crop_resize(img, small).int(), _pil_box(img, small, 224))


def test_forked_rng_seeds_the_cpu_generator_and_restores_it():
    """The per-sample seeding of the shard streams: torch's CPU generator as torch.manual_seed sets it,
    Python's and NumPy's too, all restored afterwards."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with forked_rng(7):
        inside = torch.rand(3), np.random.rand(), random.random()
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    assert torch.equal(inside[0], torch.rand(3))
    assert inside[1] == np.random.rand() and inside[2] == random.random()
