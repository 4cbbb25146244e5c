"""Supervised image pretraining, the classifier checkpoint as a LiT image source, and the two CLIs."""

from __future__ import annotations

import json

import torch

from clipforge.cli import lit as lit_cli
from clipforge.config import VisionConfig
from clipforge.lit import EmbeddingCache, ImageClassifier, build_lit_model, load_classifier
from clipforge.train.pretrain_image import pretrain_image, synthetic_labelled

VISION = VisionConfig(kind="vit", image_size=32, width=32, layers=1, heads=2, patch_size=8)


class _Tok:
    vocab_size, eot_token_id, sot_token_id, context_length = 64, 63, 62, 12


def test_pretrain_learns_synthetic_shapes():
    train, classnames = synthetic_labelled(8, image_size=32, label="colour")
    assert len(classnames) >= 2 and len(train) == 8 * len(classnames)
    torch.manual_seed(0)
    model = ImageClassifier(VISION, 16, len(classnames))
    result = pretrain_image(model, train, steps=40, batch_size=32, lr=3e-3, progress=False)
    # Colour is a trivially learnable label: the loss must fall well below chance level (ln C).
    chance = torch.log(torch.tensor(float(len(classnames)))).item()
    assert result.losses[0] > 0.9 * chance and sum(result.losses[-5:]) / 5 < 0.75 * chance


def test_cli_pretrain_then_cache_then_lit(tmp_path, capsys):
    parser = __import__("argparse").ArgumentParser()
    sub = parser.add_subparsers()
    lit_cli.register(sub)
    clf_dir = tmp_path / "clf"
    args = parser.parse_args(["pretrain-image", "--out", str(clf_dir), "--preset", "tiny-vit", "--steps", "3",
                              "--batch-size", "16", "--per-class", "4", "--quiet"])  # fmt: skip
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 3
    clf, _ = load_classifier(clf_dir)
    # The classifier's tower is the LiT image tower, locked and bit-identical.
    model, _ = build_lit_model("Lu", preset="tiny-vit", image=clf_dir, tokenizer=_Tok())
    for k, v in clf.visual.state_dict().items():
        assert torch.equal(v, model.visual.state_dict()[k])
    cache_dir = tmp_path / "cache"
    args = parser.parse_args(["cache-embeddings", "--tower", str(clf_dir), "--out", str(cache_dir),
                              "--synthetic-n", "12", "--batch-size", "8", "--quiet"])  # fmt: skip
    assert args.func(args) == 0
    cache = EmbeddingCache(cache_dir)
    assert len(cache) == 12 and cache.dim == clf.embed_dim
    # The cached embedding is the tower's output on the eval-preprocessed synthetic image.
    from clipforge.data.synthetic import ShapesConfig, make_tensors
    from clipforge.transforms import normalise_uint8

    images, _ = make_tensors(ShapesConfig(image_size=clf.vision_config.image_size, seed=0), 2, "train")
    with torch.no_grad():
        live = clf.forward_features(normalise_uint8(images))
    torch.testing.assert_close(torch.stack([cache.get(0), cache.get(1)]), live, atol=1e-5, rtol=1e-5)


def test_cli_pretrain_on_folders_reports_validation_accuracy(tmp_path, capsys):
    """Class folders: a seeded share of each class is held out (eval preprocessing) and its accuracy is
    reported; with --val, that folder is used instead."""
    from PIL import Image

    from clipforge.train.pretrain_image import folder_labelled
    from clipforge.transforms import PreprocessConfig

    for name, colour in [("red", (230, 20, 20)), ("blue", (20, 20, 230))]:
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (40, 40), tuple(c + i for c in colour)).save(
                tmp_path / "data" / name / f"{i}.png"
            )
    train, val, names = folder_labelled(str(tmp_path / "data"), PreprocessConfig(32), val_fraction=0.2)
    assert names == ["blue", "red"] and len(train) == 16 and len(val) == 4
    assert not set(train.indices) & set(val.indices)
    parser = __import__("argparse").ArgumentParser()
    lit_cli.register(parser.add_subparsers())
    args = parser.parse_args(["pretrain-image", "--data", str(tmp_path / "data"),
                              "--out", str(tmp_path / "c"), "--preset", "tiny-vit", "--image-size", "32",
                              "--steps", "30",
                              "--batch-size", "8", "--lr", "3e-3", "--quiet"])  # fmt: skip
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["val_accuracy"] is not None and 0.0 <= report["val_accuracy"] <= 1.0
