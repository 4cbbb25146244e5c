"""The CLI end to end on tiny image folders (the checkpoint loader is replaced by a tiny random model)."""

import argparse
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.cli import eval as cli_eval
from eval_helpers import WordTokenizer, tiny_model


def to_tensor(img):
    return torch.from_numpy(np.asarray(img.resize((32, 32)), dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.fixture()
def folders(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in [("train", 4), ("test", 3), ("noisy", 3)]:
        for c, color in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30)]):
            d = tmp_path / split / ["red", "blue", "green"][c]
            d.mkdir(parents=True)
            for i in range(n):
                a = np.clip(
                    np.array(color) + rng.normal(0, 60 if split == "noisy" else 20, (32, 32, 3)), 0, 255
                )
                Image.fromarray(a.astype(np.uint8)).save(d / f"{i}.png")
    rows = [{"image": f"test/red/{i}.png", "caption": ["red thing", f"red {i}"]} for i in range(3)]
    (tmp_path / "ret.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path


def run_cli(argv, monkeypatch):
    monkeypatch.setattr(cli_eval, "_load", lambda path, device: (tiny_model(), to_tensor, WordTokenizer()))
    parser = argparse.ArgumentParser()
    cli_eval.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_tasks_and_suite(folders, monkeypatch, tmp_path):
    out = tmp_path / "out"
    common = ["--model", "m", "--output", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert (
        run_cli(["eval", "zeroshot", "--dataset", str(folders / "test"), "--per-class", *common], monkeypatch)
        == 0
    )
    rec = json.loads((out / "test_zeroshot.json").read_text())
    assert set(rec) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert set(rec["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert (out / "test_confusion.png").exists() and (out / "test_per_class.md").exists()
    argv = ["eval", "few-shot", "--dataset", str(folders / "test"), "--train", str(folders / "train")]
    assert run_cli([*argv, "--ks", "1,2", "--seeds", "2", *common], monkeypatch) == 0
    fs = json.loads((out / "test_few-shot.json").read_text())["metrics"]
    assert {"acc1_k1", "acc1_prior_k2", "acc1_zeroshot"} <= set(fs) and (out / "test_fewshot.png").exists()
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # test + train features cached

    suite = {
        "model": "m",
        "batch_size": 4,
        "tasks": [
            {"task": "linear-probe", "dataset": str(folders / "test"), "train": str(folders / "train")},
            {"task": "retrieval", "dataset": str(folders / "ret.jsonl")},
            {
                "task": "robustness",
                "dataset": str(folders / "test"),
                "shifted": {"noisy": str(folders / "noisy")},
            },
        ],
    }
    import yaml

    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(suite))
    assert (
        run_cli(["eval", "suite", "--tasks", str(tmp_path / "tasks.yaml"), "--output", str(out)], monkeypatch)
        == 0
    )
    recs = json.loads((out / "suite.json").read_text())
    assert [r["task"] for r in recs] == ["linear_probe", "zeroshot_retrieval", "robustness"]
    assert 0 <= recs[0]["metrics"]["acc1"] <= 1 and "text_retrieval_recall@5" in recs[1]["metrics"]
    assert recs[1]["metrics"]["text_retrieval_recall@5"] == 1.0  # 3 images: every one within top 5
    assert "noisy/acc1" in recs[2]["metrics"] and (out / "test_robustness.png").exists()
    md = (out / "suite.md").read_text()
    assert md.count("\n") == 5 and "acc1" in md.splitlines()[0]


@pytest.mark.parametrize("task", ["linear-probe", "few-shot", "robustness"])
def test_sets_with_other_classes_than_the_test_set_are_refused(folders, monkeypatch, tmp_path, task):
    """Labels index each set's sorted folders: a train (or shifted) set without 'blue' would call its
    'green' images class 0, the test set's 'blue', and every score would be silently wrong."""
    import shutil

    other = tmp_path / "other"
    for c in ("red", "green"):
        shutil.copytree(folders / "train" / c, other / c)
    extra = ["--train", str(other)] if task != "robustness" else ["--shifted", f"shift={other}"]
    argv = ["eval", task, "--model", "m", "--dataset", str(folders / "test"), *extra]
    with pytest.raises(ValueError, match=r"other: 2 classes, the test set .*test 3: it lacks 'blue'"):
        run_cli([*argv, "--output", str(tmp_path / "out")], monkeypatch)
    (other / "blue").mkdir()  # an empty folder keeps the class: the sets line up again
    (other / "black").mkdir()
    with pytest.raises(ValueError, match=r"it adds 'black'"):
        run_cli([*argv, "--output", str(tmp_path / "out")], monkeypatch)


def test_suite_specs_are_checked_before_anything_runs(folders, monkeypatch, tmp_path):
    """A typo ('template') would run with the default templates; a missing dataset was a bare KeyError."""
    import yaml

    ok = {"task": "zeroshot", "dataset": str(folders / "test")}
    for bad, msg in [
        ({**ok, "template": "simple"}, r"task 2: task 'zeroshot': unknown keys 'template'"),
        ({"task": "zeroshot"}, r"task 2: task 'zeroshot' needs 'dataset'"),
        ({**ok, "task": "linear-probe"}, r"task 2: task 'linear-probe' needs 'train'"),
        ("zeroshot", r"task 2: a task spec is a mapping"),
        ({**ok, "batch_size": 0}, r"task 2: task 'zeroshot': batch_size must be an integer >= 1, got 0"),
        ({**ok, "task": "few-shot", "train": "x", "ks": [0, 1]}, r"task 2: .*ks must be a list of int"),
        ({**ok, "task": "few-shot", "train": "x", "seeds": []}, r"task 2: .*seeds must be a non-empty list"),
    ]:
        (tmp_path / "t.yaml").write_text(yaml.safe_dump({"model": "m", "tasks": [ok, bad]}))
        monkeypatch.setattr(cli_eval, "_load", lambda *a: pytest.fail("the model was loaded"))
        parser = argparse.ArgumentParser()
        cli_eval.register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["eval", "suite", "--tasks", str(tmp_path / "t.yaml")])
        with pytest.raises(ValueError, match=r"t\.yaml, " + msg):
            args.func(args)


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["zeroshot", "--batch-size", "0"], r"argument --batch-size: must be >= 1, got 0"),
        (["few-shot", "--train", "t", "--ks", "1,0"], r"argument --ks: must be >= 1, got 0"),
        (["few-shot", "--train", "t", "--ks", "1,a"], r"argument --ks: not an integer: 'a'"),
        (["few-shot", "--train", "t", "--seeds", "0"], r"argument --seeds: must be >= 1, got 0"),
    ],
)
def test_bad_numbers_are_argument_errors(argv, msg, capsys):
    """--batch-size 0 was 'range() arg 3 must not be zero', --ks 0 'fit_logistic: no training samples'
    after every feature was computed, --seeds 0 a matplotlib error about log scales."""
    from clipforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", *argv, "--model", "m", "--dataset", "d"])
    assert e.value.code == 2 and re.search(msg, capsys.readouterr().err)


def test_text_tasks_without_a_tokenizer_are_refused(folders, monkeypatch, tmp_path):
    """A checkpoint whose vocabulary has no tokenizer files loads with tokenizer None (and a warning);
    zero-shot then died in a traceback ('NoneType' object is not callable). The image-only probe runs."""
    monkeypatch.setattr(cli_eval, "_load", lambda path, device: (tiny_model(), to_tensor, None))
    parser = argparse.ArgumentParser()
    cli_eval.register(parser.add_subparsers(dest="command"))
    common = ["--model", "m.pt", "--dataset", str(folders / "test"), "--output", str(tmp_path / "o")]
    args = parser.parse_args(["eval", "zeroshot", *common])
    with pytest.raises(ValueError, match=r"task 'zeroshot' encodes text, and m\.pt came without a tokenizer"):
        args.func(args)
    args = parser.parse_args(["eval", "linear-probe", "--train", str(folders / "train"), *common])
    assert args.func(args) == 0
