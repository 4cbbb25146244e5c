"""Fault injection on the data paths (issue 10): cut and corrupt shards, stale shard folders, non-UTF-8
manifests, changed eval datasets, unreadable eval images, broken checkpoint files. Tiny files only."""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from clipforge.cli import main
from clipforge.cli import shards as shards_cli
from clipforge.data import ShapesConfig, WebDatasetPairs, make_pairs, write_shards
from clipforge.eval.datasets import open_retrieval


def _png(color=(200, 10, 10), size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _shards(out: Path, n: int = 12, per: int = 4) -> Path:
    write_shards(make_pairs(ShapesConfig(image_size=16, seed=1), n), out, max_count=per, progress=False)
    return out


def _to_tensor(img):
    import torch

    return torch.zeros(3, 4, 4)


def _pixels(img):
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(img.resize((32, 32)), dtype=np.float32) / 255).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------ shards
def _cut_in_a_header(tar: Path) -> None:
    """Cut the shard 100 bytes into the header of its 4th member: tarfile then ends the archive silently."""
    with tarfile.open(tar) as t:
        offset = t.getmembers()[3].offset
    tar.write_bytes(tar.read_bytes()[: offset + 100])


def test_a_shard_cut_in_a_header_counts_the_samples_it_lost(tmp_path):
    out = _shards(tmp_path / "s")
    _cut_in_a_header(out / "000001.tar")
    ds = WebDatasetPairs(out, shuffle_buffer=0, shuffle_shards=False)
    items = list(ds)
    counts = ds.skips.counts()
    # 8 good + 1 whole sample before the cut; the 3 that sizes.json lists beyond it are counted
    assert len(items) == 9 and counts.get("lost_in_shard") == 3, counts
    detail = ds.skips.examples()["lost_in_shard"][0]
    assert "000001.tar:000000004." in detail and "read 1 of the 4" in detail
    (out / "sizes.json").unlink()  # no sizes: the shard counts once, named with the member where it stops
    ds = WebDatasetPairs(out, shuffle_buffer=0, shuffle_shards=False)
    assert len(list(ds)) == 9 and ds.skips.counts() == {"corrupt_shard": 1}
    assert "000001.tar:000000004." in ds.skips.examples()["corrupt_shard"][0]


def test_the_sample_a_cut_goes_through_is_counted_with_the_cut_not_as_no_caption(tmp_path):
    out = _shards(tmp_path / "s")
    tar = out / "000001.tar"
    with tarfile.open(tar) as t:
        txt = t.getmembers()[4]  # the 2nd sample's caption: its image arrives, its caption does not
    assert txt.name.endswith(".txt")
    tar.write_bytes(tar.read_bytes()[: txt.offset_data + 10])
    ds = WebDatasetPairs(out, shuffle_buffer=0, shuffle_shards=False)
    # was {'no_caption': 1, 'lost_in_shard': 2}: the half sample passed for one without a caption
    assert len(list(ds)) == 9 and ds.skips.counts() == {"lost_in_shard": 3}
    assert "read 1 of the 4" in ds.skips.examples()["lost_in_shard"][0]
    (out / "sizes.json").unlink()
    ds = WebDatasetPairs(out, shuffle_buffer=0, shuffle_shards=False)
    assert len(list(ds)) == 9 and ds.skips.counts() == {"corrupt_shard": 1}
    assert f"sample {txt.name.split('.')[0]} cut short" in ds.skips.examples()["corrupt_shard"][0]


def test_one_corrupt_shard_does_not_stop_reading_with_workers_and_counts_reach_the_main_process(tmp_path):
    out = _shards(tmp_path / "s")
    (out / "000001.tar").write_bytes(b"not a tar" * 100)
    ds = WebDatasetPairs(out, shuffle_buffer=0, shuffle_shards=False)
    n = sum(1 for _ in DataLoader(ds, batch_size=None, num_workers=2))  # worker 1 holds only the bad shard
    assert n == 8
    assert ds.skips.counts() == {"lost_in_shard": 4}
    assert "000001.tar" in ds.skips.summary()  # the worker's detail, seen from the main process


def test_shard_image_errors_name_shard_and_member(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for name, data in [
            ("k1.png", b"\x89PNG broken"),
            ("k1.txt", b"cap"),
            ("k2.png", _png()),
            ("k2.txt", b"ok"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = WebDatasetPairs(tmp_path / "a.tar", shuffle_buffer=0)
    assert [it["text"] for it in ds] == ["ok"]
    detail = ds.skips.examples()["corrupt_image"][0]
    assert "a.tar:k1.png" in detail and "BytesIO" not in detail
    echoed: list[str] = []
    rs = open_retrieval(tmp_path / "a.tar", _to_tensor, echo=echoed.append)  # eval: skipped, not a crash
    assert rs.captions == ["ok"] and "a.tar:k1.png" in echoed[0]


def test_eval_retrieval_counts_a_cut_shard_and_names_a_bad_tar(tmp_path):
    out = _shards(tmp_path / "s")
    _cut_in_a_header(out / "000001.tar")
    echoed: list[str] = []
    rs = open_retrieval(out, _to_tensor, echo=echoed.append)
    assert len(rs.images) == 9 and "lost_in_shard 3" in echoed[0] and "000001.tar" in echoed[0]
    (tmp_path / "bad.tar").write_bytes(b"garbage" * 50)
    with pytest.raises(ValueError, match=r"no \(image, caption\) samples in .*bad\.tar.*corrupt_shard 1"):
        open_retrieval(tmp_path / "bad.tar", _to_tensor, echo=echoed.append)


def _shards_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    shards_cli.register(parser.add_subparsers())
    args = parser.parse_args(["shards", *argv, "--quiet"])
    return args.func(args)


def test_shards_into_a_non_empty_folder_refuses_or_replaces_atomically(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(_png((i * 60, 0, 0)))
        (src / f"{i}.txt").write_text(f"caption {i}")
    out = _shards(tmp_path / "out", n=12, per=2)  # 6 old shards
    assert main(["shards", str(src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{out} is not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert len(list(out.glob("*.tar"))) == 6  # untouched
    assert _shards_cli(str(src), str(out), "--overwrite", "--max-count", "2") == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "000001.tar", "sizes.json"]
    assert json.loads((out / "sizes.json").read_text()) == {"000000.tar": 2, "000001.tar": 1}
    assert not list(tmp_path.glob(".out.*"))  # no temp folder left behind
    assert sorted(it["text"] for it in WebDatasetPairs(out, shuffle_buffer=0)) == [
        f"caption {i}" for i in range(3)
    ]
    (out / "notes.md").write_text("mine")  # not a shard folder: --overwrite refuses to delete it
    with pytest.raises(ValueError, match=r"not shards \(e\.g\. notes\.md\)"):
        _shards_cli(str(src), str(out), "--overwrite")


# ------------------------------------------------------------------------------------------ manifests
def test_a_non_utf8_manifest_row_is_counted_in_training_and_an_error_naming_the_line_in_eval(tmp_path):
    from clipforge.data.pairs import ManifestPairs
    from clipforge.eval.datasets import ManifestClassificationDataset

    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(_png((i * 90, 0, 0)))
    (tmp_path / "m.csv").write_bytes(b"image,caption\n0.png,a red square\n1.png,caf\xe9 latin-1\n")
    ds = ManifestPairs(tmp_path / "m.csv")
    assert len(ds) == 1 and ds.skips.counts() == {"bad_row": 1}
    assert ds.skips.examples()["bad_row"] == ["m.csv:3: not UTF-8"]
    (tmp_path / "m.jsonl").write_bytes(
        b'{"image": "0.png", "caption": "ok"}\n{"image": "1.png", "caption": "\xff"}\n'
    )
    ds = ManifestPairs(tmp_path / "m.jsonl")
    assert len(ds) == 1 and ds.skips.counts() == {"bad_row": 1}
    (tmp_path / "l.csv").write_bytes(b"image,label\n0.png,red\n1.png,r\xe9d\n")
    with pytest.raises(ValueError, match=r"l\.csv:3: not UTF-8"):
        ManifestClassificationDataset(tmp_path / "l.csv", _to_tensor)
    with pytest.raises(ValueError, match=r"m\.csv:3: not UTF-8"):
        open_retrieval(tmp_path / "m.csv", _to_tensor)


def test_retrieval_on_a_folder_without_captions_or_an_empty_manifest_names_the_path(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "0.png").write_bytes(_png())
    with pytest.raises(ValueError, match=r"imgs: no usable image-caption pairs .*no_caption 1"):
        open_retrieval(tmp_path / "imgs", _to_tensor)
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"e\.jsonl: no usable image-caption pairs"):
        open_retrieval(tmp_path / "e.jsonl", _to_tensor)


# ------------------------------------------------------------------------------------------ eval
def _class_folder(root: Path) -> Path:
    for c, color in enumerate([(220, 20, 20), (20, 20, 220)]):
        d = root / ["red", "blue"][c]
        d.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (d / f"{i}.png").write_bytes(_png(color))
    return root


def _run_eval(argv, monkeypatch):
    from clipforge.cli import eval as cli_eval
    from eval_helpers import WordTokenizer, tiny_model

    monkeypatch.setattr(cli_eval, "_load", lambda path, device: (tiny_model(), _pixels, WordTokenizer()))
    parser = argparse.ArgumentParser()
    cli_eval.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_the_eval_feature_cache_is_keyed_by_content(tmp_path, monkeypatch):
    from clipforge.data.fingerprint import dataset_fingerprint

    data = _class_folder(tmp_path / "test")
    common = ["--model", "m", "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    argv = ["eval", "zeroshot", "--dataset", str(data), *common]
    before = dataset_fingerprint(data)
    assert _run_eval(argv, monkeypatch) == 0
    for i in range(3):  # the same path now holds other pictures: red becomes blue
        (data / "red" / f"{i}.png").write_bytes(_png((20, 20, 220), size=9))
    assert dataset_fingerprint(data) != before
    assert _run_eval(argv, monkeypatch) == 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # recomputed, not served stale
    acc = json.loads((tmp_path / "out" / "test_zeroshot.json").read_text())["metrics"]["acc1"]
    assert acc <= 0.5  # every image is blue now: at most the blue half is right
    # a manifest: its rows and the images it lists; shards: each shard's size and mtime
    (tmp_path / "m.csv").write_text("image,label\ntest/red/0.png,red\n")
    fp = dataset_fingerprint(tmp_path / "m.csv")
    (data / "red" / "0.png").write_bytes(_png((1, 2, 3), size=10))
    assert dataset_fingerprint(tmp_path / "m.csv") != fp
    out = _shards(tmp_path / "s")
    fp = dataset_fingerprint(out)
    _cut_in_a_header(out / "000002.tar")
    assert dataset_fingerprint(out) != fp


def test_an_empty_class_folder_changes_the_cache_key(tmp_path, monkeypatch):
    """An empty folder is a class (it shifts the labels after it): the cached labels must not come back."""
    from clipforge.data.fingerprint import dataset_fingerprint

    data = _class_folder(tmp_path / "test")
    common = ["--model", "m", "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    argv = ["eval", "zeroshot", "--dataset", str(data), *common]
    before = dataset_fingerprint(data)
    assert _run_eval(argv, monkeypatch) == 0
    (data / "aaa").mkdir()  # sorts first: every image's label moves up by one
    assert dataset_fingerprint(data) != before
    assert _run_eval(argv, monkeypatch) == 0
    cached = json.loads((tmp_path / "out" / "test_zeroshot.json").read_text())["metrics"]["acc1"]
    assert _run_eval(argv[:-2], monkeypatch) == 0  # no cache: computed from the images
    fresh = json.loads((tmp_path / "out" / "test_zeroshot.json").read_text())["metrics"]["acc1"]
    assert cached == fresh and len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_zeroshot_and_linear_probe_skip_bad_images_with_labels_aligned(tmp_path, monkeypatch, capsys):
    from clipforge.eval.datasets import ImageFolderDataset, ManifestClassificationDataset
    from clipforge.eval.features import encode_images
    from eval_helpers import tiny_model

    data = _class_folder(tmp_path / "test")
    (data / "red" / "9.png").write_bytes(b"\x89PNG truncated")
    train = _class_folder(tmp_path / "train")
    (train / "blue" / "9.jpg").write_bytes(b"not a jpeg")
    common = ["--model", "m", "--output", str(tmp_path / "out")]
    assert _run_eval(["eval", "zeroshot", "--dataset", str(data), *common], monkeypatch) == 0
    argv = ["eval", "linear-probe", "--dataset", str(data), "--train", str(train), *common]
    assert _run_eval(argv, monkeypatch) == 0
    err = capsys.readouterr()
    assert "corrupt_image 1" in err.out + err.err and "9.png" in err.out + err.err

    ds = ImageFolderDataset(data, _pixels)
    feats, labels = encode_images(tiny_model(), ds, batch_size=4, num_workers=0)
    assert len(feats) == 6 and labels.tolist() == [0, 0, 0, 1, 1, 1]  # blue, red: the bad red one dropped
    assert ds.skips.counts() == {"corrupt_image": 1}
    (tmp_path / "m.csv").write_text(
        "image,label\ntest/red/0.png,red\ntest/red/404.png,red\ntest/blue/0.png,blue\n"
    )
    m = ManifestClassificationDataset(tmp_path / "m.csv", _pixels)
    feats, labels = encode_images(tiny_model(), m, batch_size=2)
    assert labels.tolist() == [1, 0] and m.skips.counts() == {"missing_image": 1}


# ------------------------------------------------------------------------------------------ checkpoints
def test_a_wrong_shaped_ln_final_is_reported_as_itself(tmp_path):
    import torch

    import clipforge
    from clipforge.checkpoints.convert_openai import convert_clipforge_to_openai, convert_openai_to_clipforge
    from clipforge.checkpoints.keys import StateDictMismatchError

    m = clipforge.create_model("tiny-vit")
    sd = convert_clipforge_to_openai(m.state_dict(), m.config)
    sd["ln_final.weight"] = torch.ones(sd["ln_final.weight"].shape[0] + 8)
    with pytest.raises(StateDictMismatchError) as e:
        convert_openai_to_clipforge(sd)
    assert e.value.misshaped == ["ln_final.weight (got (72,), expected (64,))"]
    assert not e.value.missing and not e.value.unexpected


def _broken_checkpoints(tmp_path: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    good = {"a": torch.zeros(64, 64), "b": torch.ones(3)}
    save_file(good, str(tmp_path / "good.safetensors"))
    torch.save(good, tmp_path / "good.pt")
    st, pt = (tmp_path / "good.safetensors").read_bytes(), (tmp_path / "good.pt").read_bytes()
    files = {
        "trunc.safetensors": st[: len(st) // 2],
        "garbage.safetensors": b"\x12\x00\x00\x00\x00\x00\x00\x00garbage garbage garbage",
        "empty.pt": b"",
        "trunc.pt": pt[: len(pt) // 2],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


@pytest.mark.parametrize("name", ["empty.pt", "trunc.pt"])
def test_empty_or_truncated_pt_is_a_one_line_error_naming_the_file(tmp_path, capsys, name):
    path = _broken_checkpoints(tmp_path)[name]
    assert main(["convert", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(path) in err


@pytest.mark.parametrize("name", ["trunc.safetensors", "garbage.safetensors", "dir"])
def test_truncated_or_garbage_safetensors_are_one_line_errors_naming_the_file(tmp_path, capsys, name):
    import clipforge

    if name == "dir":  # a clipforge directory whose model.safetensors was cut
        from clipforge.checkpoints.save import save_pretrained

        save_pretrained(clipforge.create_model("tiny-vit"), tmp_path / "d")
        weights = tmp_path / "d" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        path = weights
        argv = ["convert", str(tmp_path / "d"), str(tmp_path / "out")]
    else:
        path = _broken_checkpoints(tmp_path)[name]
        argv = ["convert", str(path), str(tmp_path / "out")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(path) in err


# ------------------------------------------------------------------------------------------ unreadable data
def _unreadable_manifest(root: Path) -> Path:
    root.mkdir()
    (root / "bad.jpg").write_bytes(b"not an image")
    (root / "m.csv").write_text("image,caption\nbad.jpg,a red circle\nnope1.jpg,b\nnope2.jpg,c\n")
    return root / "m.csv"


@pytest.mark.parametrize("workers", [0, 1])
def test_a_manifest_whose_every_image_is_unreadable_is_one_line_with_the_reason_counts(
    tmp_path, capsys, workers
):
    from clipforge.data import ManifestPairs, UnreadableDataError

    manifest = _unreadable_manifest(tmp_path / "data")
    loader = DataLoader(ManifestPairs(manifest), batch_size=2, num_workers=workers, collate_fn=lambda b: b)
    with pytest.raises(UnreadableDataError) as info:  # still a RuntimeError: the library contract holds
        next(iter(loader))
    assert isinstance(info.value, RuntimeError)  # a worker's arrives as the same class, in torch's text
    reason = info.value.reason
    assert "\n" not in reason and reason.startswith(f"all 3 images of {manifest} failed to load")
    assert "corrupt_image 1" in reason and "missing_image 2" in reason
    # `clipforge train` ended in a traceback ('65 consecutive samples ... failed to load'), with workers
    # a multi-line 'Caught RuntimeError in DataLoader worker process 0' one
    argv = ["train", "--no-progress", "data.kind=manifest", f"data.train={manifest}", "model.preset=tiny-vit",
            "model.tokenizer=openai", "model.context_length=16", "train.batch_size=2", "train.steps=2",
            f"data.workers={workers}", "run.tensorboard=false",
            f"run.output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Caught" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"clipforge train: error: all 3 images of {manifest} failed to load: ")
    assert "corrupt_image 1" in line and "missing_image 2" in line
