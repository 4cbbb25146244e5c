"""Manifest and folder pair sources: parsing, several captions, bad data counted by reason, errors."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clipforge.data import (
    FolderPairs,
    ManifestPairs,
    SkipCounter,
    Skipped,
    collate_pairs,
    read_folder,
    read_manifest,
)


def _img(path: Path, value: int, size=(12, 10), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, np.uint8)
    arr[0, 0] = (value + 1) % 256
    Image.fromarray(arr).save(path, format=fmt)
    return path


def to_tensor(img):
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def test_csv_repeated_rows_and_separator(tmp_path):
    for i in range(3):
        _img(tmp_path / "img" / f"{i}.png", 10 * i)
    rows = [
        ("img/0.png", "a cat"),
        ("img/1.png", "a dog||a puppy"),
        ("img/0.png", "a kitten"),
        ("img/2.png", "x"),
    ]
    with (tmp_path / "m.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows(rows)
    recs = read_manifest(tmp_path / "m.csv", "filepath", "title")
    assert [(r.image, r.captions) for r in recs] == [
        (tmp_path / "img/0.png", ("a cat", "a kitten")),  # repeated rows merge, relative to the manifest
        (tmp_path / "img/1.png", ("a dog", "a puppy")),
        (tmp_path / "img/2.png", ("x",)),
    ]
    with pytest.raises(ValueError, match="no column 'image'"):
        read_manifest(tmp_path / "m.csv")  # default column names are not there


def test_tsv_and_jsonl_with_root_and_lists(tmp_path):
    _img(tmp_path / "data" / "a.jpg", 50)
    _img(tmp_path / "data" / "b.jpg", 90)
    (tmp_path / "m.tsv").write_text("image\tcaption\na.jpg\ta red, round thing\nb.jpg\tsecond\n")
    recs = read_manifest(tmp_path / "m.tsv", root=tmp_path / "data")
    assert [r.captions for r in recs] == [("a red, round thing",), ("second",)]
    assert recs[0].image == tmp_path / "data" / "a.jpg"
    lines = [{"url": str(tmp_path / "data" / "a.jpg"), "text": ["one", "two", "  three  "]},
             {"url": "data/b.jpg", "text": "four||five"}]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    recs = read_manifest(tmp_path / "m.jsonl", "url", "text")
    assert [r.captions for r in recs] == [("one", "two", "three"), ("four", "five")]
    assert recs[1].image == tmp_path / "data" / "b.jpg"
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ValueError, match="manifest format"):
        read_manifest(tmp_path / "m.txt")


def test_caption_is_picked_among_all(tmp_path):
    _img(tmp_path / "a.png", 1)
    (tmp_path / "a.txt").write_text("first\nsecond\n\nthird\n")
    ds = FolderPairs(tmp_path)
    assert ds.records[0].captions == ("first", "second", "third")
    assert {ds[0]["text"] for _ in range(60)} == {"first", "second", "third"}
    seeded = FolderPairs(tmp_path, seed=3)
    picks = [seeded[0]["text"] for _ in range(5)]
    assert len(set(picks)) == 1  # a function of (seed, epoch, index)
    assert {(seeded.set_epoch(e), seeded[0]["text"])[1] for e in range(40)} == {"first", "second", "third"}


def test_folder_with_sidecars_and_tokenizer(tmp_path):
    _img(tmp_path / "x" / "b.png", 200, size=(8, 8))
    (tmp_path / "x" / "b.txt").write_text("a caption\n")
    _img(tmp_path / "a.jpg", 100, size=(8, 8))
    (tmp_path / "a.txt").write_text("another one\n")
    calls = []

    def tokenizer(texts, context_length=77, truncate=False):
        calls.append((list(texts), context_length, truncate))
        return torch.full((len(texts), context_length), len(texts[0]), dtype=torch.long)

    ds = FolderPairs(tmp_path, transform=to_tensor, tokenizer=tokenizer, context_length=5)
    assert [r.image.relative_to(tmp_path).as_posix() for r in ds.records] == ["a.jpg", "x/b.png"]
    item = ds[1]
    assert item["image"].shape == (3, 8, 8) and torch.allclose(
        item["image"][:, 1, 1], torch.full((3,), 200 / 255)
    )
    assert item["text"].tolist() == [9] * 5 and calls[-1] == (["a caption"], 5, True)
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=ds.collate_fn)))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["text"].shape == (2, 5)


def _bad_source(tmp_path):
    """A manifest with one of every kind of bad input, plus three good rows."""
    good = [_img(tmp_path / f"g{i}.jpg", 40 * i, fmt="JPEG") for i in range(3)]
    data = good[0].read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])  # truncated jpg
    (tmp_path / "notimg.png").write_bytes(b"hello, not an image")
    rows = [
        {"image": "g0.jpg", "caption": "good zero"},
        {"image": "trunc.jpg", "caption": "truncated"},
        {"image": "missing.jpg", "caption": "no such file"},
        {"image": "g1.jpg", "caption": "   "},  # empty caption
        {"image": "g1.jpg", "caption": "good one"},
        {"image": "notimg.png", "caption": "garbage bytes"},
        {"image": "g2.jpg", "caption": 42},  # non-text caption
        {"image": "g2.jpg", "caption": ["good two", None]},
        {"image": "", "caption": "no image path"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.jsonl"


def test_bad_inputs_are_counted_by_reason_retry(tmp_path):
    ds = ManifestPairs(_bad_source(tmp_path), transform=to_tensor)
    # caption problems are found when the manifest is read
    assert ds.skips.counts() == {"no_image": 1, "empty_caption": 1, "non_text_caption": 2, "bad_row": 1}
    items = [ds[i] for i in range(len(ds))]  # 6 images: 3 good, 3 unreadable -> replaced by the next good one
    assert all(isinstance(it, dict) and it["image"].shape == (3, 10, 12) for it in items)
    assert ds.skips.counts() == {
        "missing_image": 1, "corrupt_image": 2, "no_image": 1, "empty_caption": 1, "non_text_caption": 2,
        "bad_row": 1,
    }  # fmt: skip
    summary = ds.skips.summary()
    assert "missing_image 1" in summary and "missing.jpg" in summary and str(ds.source) in summary


def test_bad_inputs_skipped_by_collate_in_workers(tmp_path):
    ds = ManifestPairs(_bad_source(tmp_path), transform=to_tensor, retry=False)
    assert isinstance(ds[1], Skipped) and ds[1].reason == "corrupt_image"
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=ds.collate_fn)
    batches = list(loader)
    assert sum(len(b["image"]) for b in batches if b is not None) == 3
    counts = ds.skips.counts()  # recorded inside the worker processes, visible here
    assert counts["missing_image"] == 1 and counts["corrupt_image"] == 2
    assert collate_pairs([Skipped("missing_image")]) is None


def test_folder_bad_sidecars(tmp_path):
    _img(tmp_path / "a.png", 1)
    (tmp_path / "a.txt").write_text("fine\n")
    _img(tmp_path / "b.png", 2)  # no sidecar
    _img(tmp_path / "c.png", 3)
    (tmp_path / "c.txt").write_text("\n  \n")
    _img(tmp_path / "d.png", 4)
    (tmp_path / "d.txt").write_bytes(b"\xff\xfe\xfa bad")
    skips = SkipCounter()
    recs = read_folder(tmp_path, skips=skips)
    assert [r.image.name for r in recs] == ["a.png"]
    assert skips.counts() == {"empty_caption": 1, "non_text_caption": 1, "no_caption": 1}


def test_empty_sources_are_errors_that_name_them(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no usable image-caption pairs in .*empty"):
        FolderPairs(tmp_path / "empty")
    (tmp_path / "m.csv").write_text("image,caption\na.jpg,\n")
    with pytest.raises(ValueError, match=r"m\.csv.*empty_caption 1"):
        ManifestPairs(tmp_path / "m.csv")
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        ManifestPairs(tmp_path / "nope.csv")
    (tmp_path / "all_bad.csv").write_text("image,caption\nx.jpg,hello\ny.jpg,world\n")
    ds = ManifestPairs(tmp_path / "all_bad.csv")
    with pytest.raises(RuntimeError, match=r"all_bad\.csv.*missing_image"):
        ds[0]


def test_a_manifest_root_that_does_not_exist_is_named(tmp_path, capsys):
    from clipforge.cli import main

    (tmp_path / "m.csv").write_text("image,caption\na.jpg,hello\nb.jpg,world\n")
    with pytest.raises(FileNotFoundError, match=r"m\.csv: root folder of its image paths not found: .*nope"):
        ManifestPairs(tmp_path / "m.csv", root=tmp_path / "nope")
    # `clipforge train data.root=<typo>` ran until 'N consecutive samples failed to load', a traceback
    argv = ["train", "--no-progress", "data.kind=manifest", f"data.train={tmp_path / 'm.csv'}",
            f"data.root={tmp_path / 'nope'}", "model.tokenizer=openai", "train.batch_size=2",
            f"run.output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "root folder of its image paths not found" in err and "Traceback" not in err


def test_skip_counter_rejects_unknown_reason_and_merges():
    a, b = SkipCounter("a"), SkipCounter("b")
    a.record("missing_image", "x.jpg")
    b.record("missing_image", n=2)
    b.record("bad_row")
    a.update(b)
    assert a.counts() == {"missing_image": 3, "bad_row": 1} and a.total == 4
    with pytest.raises(ValueError, match="unknown skip reason"):
        a.record("cosmic_ray")
