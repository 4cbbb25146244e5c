"""`clipforge train` from files: manifests, caption folders, WebDataset shards; skip counts; evaluation;
export; resume (SIGTERM mid-run vs uninterrupted, map-style and streaming)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipforge
from clipforge.checkpoints import save_pretrained
from clipforge.cli import main as cli_main
from clipforge.config import get_config
from clipforge.data import read_folder, write_shards
from clipforge.data.sources import StreamOptions
from clipforge.eval import load_templates
from clipforge.models import create_model
from clipforge.tokenizer import Tokenizer, train_bpe
from clipforge.train.build import build_trainer, open_data, run_experiment
from clipforge.train.experiment import load_experiment
from clipforge.train.metrics import read_metrics
from clipforge.train.runs import load_checkpoint
from clipforge.train.trainer import TrainingInterrupted
from clipforge.transforms import eval_transform, train_transform

COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models on a shared 2-core machine: one intra-op thread is ~50x faster than two contended ones
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


RGB = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _png(path: Path, colour: str, k: int) -> None:
    rng = np.random.default_rng(k)
    a = np.clip(np.array(RGB[colour]) + rng.integers(-25, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
    a[k % 30 : k % 30 + 8, 4:12] = 255 - a[k % 30 : k % 30 + 8, 4:12]  # a per-image mark
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    img = root / "img"
    rows = []
    for k in range(60):  # 60 good pairs; a few with two captions
        c = COLOURS[k % 4]
        _png(img / f"{k:03d}.png", c, k)
        cap = f"a {c} square number {k}" + (f"||a {c} picture {k}" if k % 7 == 0 else "")
        rows.append({"image": f"img/{k:03d}.png", "caption": cap})
    (img / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rows.append({"image": "img/corrupt.png", "caption": "a broken file"})
    rows.append({"image": "img/missing.png", "caption": "a file that is not there"})
    _png(img / "nocap.png", "red", 99)
    rows.append({"image": "img/nocap.png", "caption": "   "})  # empty caption
    with (root / "train.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["image", "caption"])
        w.writeheader()
        w.writerows(rows)
    # held-out pairs (retrieval) and a labelled set of class folders (zero-shot)
    val = []
    for k in range(12):
        c = COLOURS[k % 4]
        _png(root / "val" / f"v{k}.png", c, 200 + k)
        val.append(json.dumps({"image": f"val/v{k}.png", "caption": f"a {c} square number {200 + k}"}))
    (root / "val.jsonl").write_text("\n".join(val) + "\n")
    for c in COLOURS:
        for k in range(3):
            _png(root / "classes" / c / f"{k}.png", c, 300 + k)
    # a caption folder: sidecar .txt per image, plus a corrupt image, an empty caption file, no caption
    folder = root / "folder"
    for k in range(40):
        c = COLOURS[k % 4]
        _png(folder / f"{k:03d}.png", c, k)
        (folder / f"{k:03d}.txt").write_text(f"a {c} square number {k}\n")
    (folder / "bad.png").write_bytes(b"GIF89a broken")
    (folder / "bad.txt").write_text("a broken image\n")
    _png(folder / "empty.png", "red", 77)
    (folder / "empty.txt").write_text("\n  \n")
    _png(folder / "lonely.png", "red", 78)
    # shards from the folder's records (no verification: the corrupt image goes in as it is)
    write_shards(read_folder(folder), root / "shards", max_count=12, verify=False, progress=False)
    # a small saved vocabulary (model.tokenizer=<dir>) keeps the tiny models' embeddings small
    train_bpe([r["caption"] for r in rows] * 2, vocab_size=560, context_length=16).save(root / "tok")
    return {"root": root}


def _overrides(root: Path, out: Path, **extra) -> list[str]:
    base = {
        "model.preset": "tiny-vit",
        "model.context_length": 16,
        "model.tokenizer": root / "tok",
        "data.kind": "manifest",
        "data.train": str(root / "train.csv"),
        "data.augment": "square_crop",
        "train.steps": 4,
        "train.batch_size": 31,
        "optim.warmup_steps": 1,
        "optim.lr": 1e-3,
        "run.output_dir": str(out),
        "run.log_every": 1,
        "run.checkpoint_every": 2,
        "run.tensorboard": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == kind]


def test_manifest_cli_end_to_end_skips_eval_and_export(data, tmp_path):
    root, out = data["root"], tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  tokenizer: bpe\n  vocab_size: 600\ndata:\n  kind: manifest\n")
    extra = {"data.val": root / "val.jsonl", "data.val_labelled": root / "classes"}
    over = [o for o in _overrides(root, out, **extra) if not o.startswith("model.tokenizer")]
    rc = cli_main(["train", "--config", str(cfg), "--no-progress", *over])
    assert rc == 0
    # 62 records (60 good + corrupt + missing), batch 31: every index once per epoch of 2 steps
    data_recs = _records(out, "data")
    assert [(r["epoch"], r["step"], r["partial"]) for r in data_recs] == [(0, 2, False), (1, 4, True)]
    assert data_recs[0]["skipped"] == {"missing_image": 1, "corrupt_image": 1, "empty_caption": 1}
    assert data_recs[1]["skipped"] == {"missing_image": 1, "corrupt_image": 1}
    assert data_recs[1]["skipped_total"] == {"missing_image": 2, "corrupt_image": 2, "empty_caption": 1}
    train = _records(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4] and train[-1]["skipped"]["corrupt_image"] == 2
    assert (out / "tokenizer" / "vocab.json").is_file()  # the trained BPE is kept in the run dir

    # the export loads back as the trained model (the final checkpoint's weights)
    model, _, tok = clipforge.load(out / "model")
    state = load_checkpoint(out / "checkpoints" / "step-00000004.safetensors")
    ref = create_model(model.config)
    ref.load_state_dict(state["model"])
    ref.eval()
    x = torch.randn(3, 3, 32, 32)
    t = tok(["a red square", "a blue picture", "x"], context_length=16)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), ref.encode_image(x), rtol=0, atol=0)
        torch.testing.assert_close(model.encode_text(t), ref.encode_text(t), rtol=0, atol=0)
    assert tok.vocab_size == model.config.text.vocab_size <= 600

    # in-training zero-shot top-1 equals a plain loop over the class folders with the exported model
    (ev,) = _records(out, "eval")
    templates = [t.replace("{c}", "{}") for t in load_templates("simple")]
    with torch.no_grad():
        w = []
        classes = sorted(COLOURS)  # class folders in sorted order
        for c in classes:
            e = F.normalize(
                model.encode_text(tok([tp.format(c) for tp in templates], context_length=16)), dim=-1
            )
            w.append(F.normalize(e.mean(0), dim=0))
        correct = n = 0
        tf = eval_transform(32)
        for y, c in enumerate(classes):
            for p in sorted((root / "classes" / c).iterdir()):
                f = F.normalize(model.encode_image(tf(Image.open(p))[None]), dim=-1)
                correct += int((f @ torch.stack(w).T).argmax() == y)
                n += 1
    assert ev["zeroshot/acc1"] == pytest.approx(correct / n)
    assert {"retrieval/image_retrieval_recall@1", "retrieval/text_retrieval_recall@10"} <= set(ev)
    assert all(0.0 <= v <= 1.0 for k, v in ev.items() if "recall" in k)
    assert (out / "plots" / "loss.png").is_file() and (out / "experiment.yaml").is_file()


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_resume_matches_uninterrupted_run(data, tmp_path, workers, monkeypatch):
    monkeypatch.setattr("clipforge.train.trainer.plot_metrics", lambda *a, **k: [])  # not under test here
    root = data["root"]
    extra = {"data.workers": workers, "data.augment": "random_resized_crop"}
    full = load_experiment(None, _overrides(root, tmp_path / "full", **extra))
    run_experiment(full, progress=False)

    cut = load_experiment(None, _overrides(root, tmp_path / "cut", **extra))
    built = build_trainer(cut, progress=False)
    after = built.trainer.after_step

    def stop_at_3(m):  # a real SIGTERM in the middle of epoch 1 (epochs are 2 steps)
        after(m)
        if built.trainer.step == 2:  # after_step runs before the step counter moves: this is step 3
            os.kill(os.getpid(), signal.SIGTERM)

    built.trainer.after_step = stop_at_3
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 3"):
        built.trainer.fit()
    run_experiment(cut, resume=True, progress=False)

    def curve(out):
        return [(r["step"], r["loss"], r["lr"]) for r in _records(out, "train")]

    a, b = curve(tmp_path / "full"), curve(tmp_path / "cut")
    assert [s for s, _, _ in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([x[1:] for x in b], [x[1:] for x in a], rtol=1e-6, atol=0)
    assert (
        _records(tmp_path / "cut", "data")[-1]["skipped_total"]
        == _records(tmp_path / "full", "data")[-1]["skipped_total"]
    )


def _wds_exp(root: Path, out: Path, workers: int):
    return load_experiment(
        None,
        _overrides(
            root,
            out,
            **{
                "data.kind": "webdataset",
                "data.train": root / "shards",
                "data.shuffle_buffer": 8,
                "data.workers": workers,
                "train.batch_size": 4,
            },
        ),
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_resume_neither_loses_nor_repeats(data, tmp_path, workers):
    exp = _wds_exp(data["root"], tmp_path / "w", workers)
    tok = Tokenizer.from_openai_vocab(context_length=16)

    def stream():
        src = open_data(exp, 32)
        pairs = src.dataset(train_transform(32, mode="random_resized_crop", scale=(0.5, 1.0)), tok, 16)
        return src.stream(pairs, StreamOptions(4, seed=0, workers=exp.data.workers))

    def take(s, n):
        it = iter(s)
        return [next(it) for _ in range(n)]

    ref_stream = stream()
    ref = take(ref_stream, 9)  # 40 good samples in 4 shards: >= 9 full batches per epoch, any split
    assert ref_stream.epoch == 0
    first = stream()
    part = take(first, 4)
    state = first.state_dict()
    resumed = stream()
    resumed.load_state_dict(state)
    rest = take(resumed, 5)
    got = part + rest
    for x, y in zip(got, ref, strict=True):
        assert torch.equal(x["text"], y["text"]) and torch.equal(x["image"], y["image"])
    seen = [tuple(t.tolist()) for b in ref for t in b["text"]]
    assert len(seen) == len(set(seen))  # nothing repeated within the epoch


def test_folder_and_shards_train_and_count(data, tmp_path):
    root = data["root"]
    over = _overrides(
        root, tmp_path / "f", **{"data.kind": "folder", "data.train": root / "folder", "train.steps": 2}
    )
    run_experiment(load_experiment(None, [*over, "train.batch_size=41"]), progress=False)
    (rec,) = _records(tmp_path / "f", "data")[:1]
    assert rec["epoch"] == 0 and rec["skipped"] == {"corrupt_image": 1, "empty_caption": 1, "no_caption": 1}

    exp = _wds_exp(root, tmp_path / "s", 0).with_overrides(["train.steps=12"])
    res = run_experiment(exp, progress=False)
    assert res.step == 12
    data_recs = _records(tmp_path / "s", "data")
    assert data_recs[0]["epoch"] == 0 and not data_recs[0]["partial"]
    assert data_recs[0]["skipped"] == {"corrupt_image": 1}  # one bad sample per pass over the shards
    assert clipforge.load(tmp_path / "s" / "model")[0].config.vision.image_size == 32


def test_source_without_usable_pairs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("image,caption\na.png,\nb.png,  \n")
    rc = cli_main(
        [
            "train",
            "--no-progress",
            *_overrides(tmp_path, tmp_path / "r", **{"data.train": tmp_path / "m.csv"}),
        ]
    )
    assert rc == 1 and "no usable image-caption pairs" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"needs data\.train"):
        load_experiment(None, ["data.kind=folder"])


def test_finetune_from_checkpoint_keeps_architecture(data, tmp_path):
    root = data["root"]
    cfg = get_config("tiny-vit")
    tok = Tokenizer.load(root / "tok")
    start = create_model(
        cfg.replace(text=dataclasses.replace(cfg.text, context_length=16, vocab_size=tok.vocab_size))
    )
    save_pretrained(start, tmp_path / "start", tokenizer=tok)
    over = _overrides(root, tmp_path / "ft", **{"model.checkpoint": tmp_path / "start", "train.steps": 1})
    res = run_experiment(
        load_experiment(None, [o for o in over if not o.startswith(("model.context", "model.tokenizer"))]),
        progress=False,
    )
    assert res.step == 1
    model, _, _ = clipforge.load(tmp_path / "ft" / "model")
    assert model.config == start.config
    assert not torch.equal(model.text.proj, start.text.proj)  # it trained


def test_example_config_loads():
    exp = load_experiment(Path(__file__).parents[1] / "examples" / "train_manifest.yaml")
    assert (exp.data.kind, exp.model.tokenizer, exp.data.augment) == ("manifest", "bpe", "square_crop")
