"""LiT end to end on files, through the CLI as a user runs it: JPEGs in class folders + a CSV manifest ->
`pretrain-image` on the folders -> `cache-embeddings` from the manifest -> `train` Lu from the cache
and LU with the pretrained MiniLM text tower -> `clipforge.load` both models -> `eval zeroshot` on
each (JSON) -> `convert --format clipforge`. The cache-trained run never calls the image tower and
keeps it bit-identical to the pretrained classifier's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clipforge
from clipforge.cli import main
from clipforge.lit import load_classifier
from clipforge.models.hf_text import HFTextEncoder
from clipforge.models.vision import VisionTransformer
from clipforge.train import build as build_mod
from helpers import minilm_dir

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
PER_CLASS = 12  # 48 JPEGs


def _write_files(root: Path) -> tuple[Path, Path]:
    """classes/<colour>/NN.jpg (noisy colour squares, two sizes) and pairs.csv captioning every image."""
    rng = np.random.default_rng(0)
    rows = []
    for name, rgb in COLOURS.items():
        (root / "classes" / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            h, w = (40, 48) if i % 2 else (36, 36)
            arr = np.clip(np.array(rgb) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            rel = f"classes/{name}/{i:02d}.jpg"
            Image.fromarray(arr).save(root / rel, quality=90)
            rows.append(f'{rel},"a photo of a {name} square||a {name} picture"\n')
    manifest = root / "pairs.csv"
    manifest.write_text("image,caption\n" + "".join(rows))
    return root / "classes", manifest


def _train_args(out: Path, lit: str, tower: Path, *extra: str) -> list[str]:
    return ["train", "--no-progress", f"model.lit={lit}", f"model.image_tower={tower}",
            "model.preset=tiny-vit", "model.context_length=16", "train.steps=3", "train.batch_size=16",
            "train.device=cpu", "optim.warmup_steps=1", "optim.lr=1e-3", f"run.output_dir={out}",
            "run.checkpoint_every=100", "run.tensorboard=false", *extra]  # fmt: skip


def _zeroshot(model_dir: Path, classes: Path, out: Path) -> dict:
    argv = ["eval", "zeroshot", "--model", str(model_dir), "--dataset", str(classes), "--templates",
            "simple", "--output", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    (report,) = out.glob("*_zeroshot.json")
    return json.loads(report.read_text())


def test_lit_end_to_end_on_files(tmp_path, monkeypatch, capsys):
    minilm = minilm_dir()
    classes, manifest = _write_files(tmp_path)

    # 1. a supervised image tower on the class folders (tiny-vit's tower at 32 px), with validation
    tower = tmp_path / "tower"
    argv = ["pretrain-image", "--data", str(classes), "--out", str(tower), "--preset", "tiny-vit",
            "--steps", "4", "--batch-size", "16", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    pre = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert pre["classes"] == 4 and pre["val_accuracy"] is not None

    # 2. its embeddings of every manifest image, once
    cache = tmp_path / "cache"
    argv = ["cache-embeddings", "--tower", str(tower), "--data", str(manifest), "--out", str(cache),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["kind"] == "manifest" and info["samples"] == len(COLOURS) * PER_CLASS and not info["skipped"]

    # 3. Lu from the cache: count every image-tower call while training (evaluators left out: they run
    # the tower on their own images, by design)
    calls: list[bool] = []
    original = VisionTransformer.forward

    def counting(self, *a, **kw):
        calls.append(self.training)
        return original(self, *a, **kw)

    monkeypatch.setattr(VisionTransformer, "forward", counting)
    monkeypatch.setattr(build_mod, "build_evaluators", lambda *a: {})
    lu = tmp_path / "Lu"
    argv = _train_args(lu, "Lu", tower, "model.tokenizer=bpe", "model.vocab_size=600", "data.kind=manifest",
                       f"data.train={manifest}", f"data.embedding_cache={cache}")  # fmt: skip
    assert main(argv) == 0
    assert calls == []  # every image embedding came from the cache
    monkeypatch.setattr(VisionTransformer, "forward", original)

    # 4. LU: the locked tower run live on the manifest, MiniLM tuned
    big_lu = tmp_path / "LU"
    argv = _train_args(big_lu, "LU", tower, f"model.text_tower={minilm}", "data.kind=manifest",
                       f"data.train={manifest}", "data.augment=none")  # fmt: skip
    assert main(argv) == 0

    clf, _ = load_classifier(tower)
    reference = clf.visual.state_dict()
    for run in (lu, big_lu):
        model, preprocess, tokenizer = clipforge.load(run / "model")
        for k, v in model.visual.state_dict().items():
            assert torch.equal(v, reference[k]), f"{run.name}: locked weight {k} changed"
        pixels = preprocess(Image.open(classes / "red" / "00.jpg")).unsqueeze(0)
        feats = model.encode_image(pixels)
        assert feats.shape == (1, model.config.embed_dim) and torch.isfinite(feats).all()
        assert torch.isfinite(model.encode_text(tokenizer(["a photo of a red square"]))).all()
    assert not isinstance(clipforge.load(lu / "model")[0].text, HFTextEncoder)  # our text tower, BPE
    lu_big, _, lu_big_tok = clipforge.load(big_lu / "model")
    assert isinstance(lu_big.text, HFTextEncoder)  # MiniLM, with its own tokenizer
    assert lu_big_tok(["a red square"])[0, 0].item() == 101  # BERT's [CLS]

    # 5. zero-shot on the class folders, from the CLI, one CLIP_benchmark-shaped JSON per model
    for run in (lu, big_lu):
        rec = _zeroshot(run / "model", classes, tmp_path / f"eval_{run.name}")
        assert rec["task"] == "zeroshot_classification" and rec["dataset"] == "classes"
        assert 0.0 <= rec["metrics"]["acc1"] <= 1.0

    # 6. convert: the same features from the rewritten directory
    for run in (lu, big_lu):
        dst = tmp_path / f"converted_{run.name}"
        assert main(["convert", str(run / "model"), str(dst), "--format", "clipforge"]) == 0
        a, pre_a, tok_a = clipforge.load(run / "model")
        b, _, tok_b = clipforge.load(dst)
        pixels = pre_a(Image.open(classes / "blue" / "03.jpg")).unsqueeze(0)
        text = ["a photo of a blue square"]
        assert torch.equal(tok_a(text), tok_b(text))
        with torch.no_grad():
            assert torch.equal(a.encode_image(pixels), b.encode_image(pixels))
            assert torch.equal(a.encode_text(tok_a(text)), b.encode_text(tok_b(text)))
