"""Synthetic shapes: determinism, the compositional split, caption diversity, shifts, labels, speed."""

import random
import re
import time

import numpy as np
import pytest
import torch

from clipforge.data import (
    COLOURS,
    SHAPES,
    SHIFTS,
    ShapesConfig,
    SyntheticPairs,
    TensorPairs,
    all_combos,
    classification_set,
    holdout_combos,
    make_captions,
    make_pairs,
    make_scenes,
    make_tensors,
    seen_combos,
)

CFG = ShapesConfig(image_size=64, seed=0, holdout_fraction=0.2)
# An independent caption parser: every colour word directly followed by a shape word (singular/plural).
PAIR_RE = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})(?:s|es)?\b")


def parse_pairs(caption: str) -> set[tuple[str, str]]:
    return set(PAIR_RE.findall(caption))


def test_same_seed_same_bytes_and_prefix_stable():
    a, ca = make_tensors(CFG, 40)
    b, cb = make_tensors(ShapesConfig(image_size=64, seed=0, holdout_fraction=0.2), 40)
    assert torch.equal(a, b) and ca == cb
    c, cc = make_tensors(CFG, 10, start=30)  # item i does not depend on how many were asked for
    assert torch.equal(c, a[30:]) and cc == ca[30:]
    d, cd = make_tensors(ShapesConfig(seed=1), 40)
    assert not torch.equal(a, d) and ca != cd
    assert make_captions(CFG, 40) == ca  # the caption-only path agrees with rendering


@pytest.mark.parametrize("seed,fraction", [(0, 0.2), (1, 0.2), (2, 0.5), (3, 0.1)])
def test_holdout_keeps_every_colour_and_shape(seed, fraction):
    cfg = ShapesConfig(seed=seed, holdout_fraction=fraction)
    held, seen = set(holdout_combos(cfg)), set(seen_combos(cfg))
    assert len(held) == round(fraction * 64) and held.isdisjoint(seen) and held | seen == set(all_combos(cfg))
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)


def test_held_out_combos_never_in_training_captions_or_images():
    held = set(holdout_combos(CFG))
    scenes = make_scenes(CFG, 1500, "train")
    caption_pairs = set()
    for sc in scenes:
        found = parse_pairs(sc.caption)
        assert found, f"no colour-shape pair in {sc.caption!r}"
        assert found == {(o.colour, o.shape) for o in sc.objects}, sc.caption  # captions describe the image
        caption_pairs |= found
    assert not caption_pairs & held
    assert {c for c, _ in caption_pairs} == set(COLOURS)  # every colour and every shape is seen in training
    assert {s for _, s in caption_pairs} == set(SHAPES)
    assert len(caption_pairs) == 64 - len(held)  # and every seen combination
    for sc in make_scenes(CFG, 200, "unseen"):
        assert {(o.colour, o.shape) for o in sc.objects} <= held
        assert parse_pairs(sc.caption) <= held


def test_caption_diversity():
    captions = make_captions(CFG, 4000)
    rng = random.Random(0)
    uniques = [len(set(rng.sample(captions, 128))) for _ in range(20)]
    assert min(uniques) >= 100, uniques
    assert len({c.split()[0] for c in captions}) >= 8  # templates vary the sentence shape too


def test_scene_kinds_and_counts():
    scenes = make_scenes(CFG, 600)
    kinds = {k: sum(sc.kind == k for sc in scenes) for k in ("single", "count", "multi")}
    assert all(n > 60 for n in kinds.values()), kinds
    for sc in scenes:
        if sc.kind == "count":  # "two small blue squares": identical objects, the number in words
            assert len({(o.colour, o.shape, o.size) for o in sc.objects}) == 1
            assert {2: "two", 3: "three"}[len(sc.objects)] in sc.caption.split()


def _colour_pixels(img: np.ndarray, colour: str, tol: int = 0) -> int:
    return int((np.abs(img.astype(int) - np.array(COLOURS[colour])).max(-1) <= tol).sum())


def test_objects_are_drawn_in_their_colour_and_place():
    for sc in make_scenes(CFG, 100):
        arr = np.asarray(sc.image)
        for (
            o
        ) in sc.objects:  # the object's centre pixel has its exact colour (shapes are convex at the centre)
            assert tuple(arr[int(o.y), int(o.x)]) == COLOURS[o.colour], (sc.caption, o)


@pytest.mark.parametrize("shift", [s for s in SHIFTS if s != "none"])
def test_shifted_variants_differ_but_keep_the_scene(shift):
    base = make_scenes(CFG, 30, "seen_eval")
    shifted = make_scenes(CFG, 30, "seen_eval", shift=shift)
    assert [s.caption for s in base] == [s.caption for s in shifted]
    assert [s.objects for s in base] == [s.objects for s in shifted]
    diffs = [
        np.abs(np.asarray(a.image, float) - np.asarray(b.image, float)).mean() for a, b in zip(base, shifted)
    ]
    assert min(diffs) > 0.5, (shift, min(diffs))
    again = make_scenes(CFG, 30, "seen_eval", shift=shift)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(shifted, again))


def test_unknown_shift_and_split():
    with pytest.raises(ValueError, match="unknown shift"):
        make_pairs(CFG, 2, shift="fog")
    with pytest.raises(ValueError, match="unknown split"):
        make_pairs(CFG, 2, split="test")


def test_classification_set_combo_labels():
    held = holdout_combos(CFG)
    x, y, names = classification_set(CFG, 3, "unseen")
    assert x.dtype == torch.uint8 and x.shape == (3 * len(held), 3, 64, 64)
    assert len(names) == 64 and 1 / len(names) <= 0.05  # chance level on unseen combinations
    assert sorted({names[i] for i in y.tolist()}) == sorted(f"{c} {s}" for c, s in held)
    assert torch.bincount(y, minlength=64)[y.unique()].eq(3).all()  # balanced
    for img, label in zip(x, y.tolist()):  # the pictured object has the labelled colour
        colour = names[label].split()[0]
        assert _colour_pixels(img.permute(1, 2, 0).numpy(), colour) >= 20, names[label]
    _, ys, names_split = classification_set(CFG, 1, "seen_eval", classes="split")
    assert names_split == [f"{c} {s}" for c, s in seen_combos(CFG)] and sorted(ys.tolist()) == list(range(51))


@pytest.mark.parametrize("label,classes", [("shape", SHAPES), ("colour", tuple(COLOURS))])
def test_classification_set_shape_or_colour_labels(label, classes):
    x, y, names = classification_set(CFG, 4, "train", label=label)
    assert names == list(classes) and len(x) == 4 * len(classes)
    assert torch.bincount(y).tolist() == [4] * len(classes)
    if label == "colour":
        for img, k in zip(x, y.tolist()):
            assert _colour_pixels(img.permute(1, 2, 0).numpy(), names[k]) >= 20


def test_tensor_pairs_crops_and_normalises():
    x, _ = make_tensors(CFG, 6)
    tokens = torch.arange(6 * 4).view(6, 4)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    ds = TensorPairs(x, tokens, crop=56, mean=mean.flatten().tolist(), std=std.flatten().tolist())
    item = ds[2]
    assert item["image"].shape == (3, 56, 56) and torch.equal(item["text"], tokens[2])
    full = (x[2].float() / 255 - mean) / std
    windows = [full[:, t : t + 56, s : s + 56] for t in range(9) for s in range(9)]
    assert any(torch.allclose(item["image"], w) for w in windows)  # a square window of the image
    torch.manual_seed(0)
    crops = [ds[2]["image"] for _ in range(30)]
    assert any(not torch.equal(crops[0], c) for c in crops)  # random crops vary
    ev = TensorPairs(
        x, tokens, crop=56, train=False, mean=mean.flatten().tolist(), std=std.flatten().tolist()
    )
    assert torch.allclose(ev[1]["image"], ((x[1].float() / 255 - mean) / std)[:, 4:60, 4:60])
    with pytest.raises(ValueError, match="images but"):
        TensorPairs(x, tokens[:3])


def test_synthetic_pairs_with_transform_and_tokenizer():
    def transform(img):
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255

    def tokenizer(texts, context_length=77, truncate=False):
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [ord(ch) for ch in t][:context_length]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    ds = SyntheticPairs(CFG, 20, "train", transform=transform, tokenizer=tokenizer, context_length=16)
    pairs = make_pairs(CFG, 20)
    item = ds[7]
    assert item["image"].shape == (3, 64, 64) and item["text"].shape == (16,)
    assert torch.equal(item["image"], transform(pairs[7][0]))
    assert "".join(map(chr, item["text"].tolist())).rstrip("\0") == pairs[7][1][:16]
    assert ds.captions() == [c for _, c in pairs]


def test_render_speed_at_64px():
    make_pairs(CFG, 50)  # warm the background caches
    best = 0.0
    for _ in range(3):  # CPU time, not wall time: other processes share the machine
        t = time.process_time()
        make_pairs(CFG, 400, start=1000)
        best = max(best, 400 / max(time.process_time() - t, 1e-9))
    assert best >= 2000, f"{best:.0f} images/s"
