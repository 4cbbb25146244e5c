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
