"""WebDataset shards: writing (sizes.json, size bounds, skips), reading back exactly once, order, bad data."""

import argparse
import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from clipforge.cli import shards as shards_cli
from clipforge.data import (
    ShapesConfig,
    WebDatasetPairs,
    make_pairs,
    parse_size,
    write_pair_folder,
    write_shards,
)
from clipforge.data.wds import shard_urls

CFG = ShapesConfig(image_size=32, seed=5)


def _folder(tmp_path, n=11):
    """n synthetic pairs as a folder with sidecars (one image with 2 captions), plus a corrupt image and an
    image without a caption."""
    pairs = make_pairs(CFG, n)
    pairs = [(im, [cap, cap + " again"] if i == 0 else cap) for i, (im, cap) in enumerate(pairs)]
    root = write_pair_folder(pairs, tmp_path / "src")
    (root / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "zz_bad.txt").write_text("broken image\n")
    Image.new("RGB", (8, 8)).save(root / "zz_nocap.png")
    return root, pairs


def _read_shards(tar_paths):
    """Independent reader (tarfile): {key: {ext: bytes}}."""
    out = {}
    for p in tar_paths:
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_write_from_folder_and_read_back_exactly_once(tmp_path):
    root, pairs = _folder(tmp_path)
    parser = argparse.ArgumentParser()
    shards_cli.register(parser.add_subparsers())
    args = parser.parse_args(["shards", str(root), str(tmp_path / "out"), "--max-count", "4", "--quiet"])
    assert args.func(args) == 0
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {"000000.tar": 4, "000001.tar": 4, "000002.tar": 3}
    tars = sorted((tmp_path / "out").glob("*.tar"))
    assert [p.name for p in tars] == list(sizes) and not list((tmp_path / "out").glob("*.tmp"))
    raw = _read_shards(tars)
    assert len(raw) == 11 and all({"png", "txt", "json"} <= set(v) for v in raw.values())
    # every source pair exactly once, pixels intact
    by_caption = {v["txt"].decode().split("\n")[0]: v for v in raw.values()}
    for im, cap in pairs:
        first = cap[0] if isinstance(cap, list) else cap
        got = np.asarray(Image.open(io.BytesIO(by_caption[first]["png"])))
        assert np.array_equal(got, np.asarray(im))
    assert by_caption[pairs[0][1][0]]["txt"].decode().split("\n") == pairs[0][1]
    # the streaming reader yields each sample once, over 2 workers too
    ds = WebDatasetPairs(tmp_path / "out", shuffle_buffer=4, seed=0)
    assert ds.num_samples() == 11
    seen = Counter()
    for item in DataLoader(ds, batch_size=None, num_workers=2):
        seen[item["text"].removesuffix(" again")] += 1
    assert seen == Counter(c[0] if isinstance(c, list) else c for _, c in pairs)


def test_cli_reports_skipped_items(tmp_path, capsys):
    root, _ = _folder(tmp_path, n=3)
    parser = argparse.ArgumentParser()
    shards_cli.register(parser.add_subparsers())
    args = parser.parse_args(["shards", str(root), str(tmp_path / "o"), "--quiet"])
    args.func(args)
    out = capsys.readouterr().out
    assert "wrote 3 samples in 1 shards" in out and "corrupt_image 1" in out and "no_caption 1" in out


def test_size_bound_and_manifest_source(tmp_path):
    _, pairs = _folder(tmp_path, n=12)
    lines = [json.dumps({"img": f"src/{i:06d}.png", "cap": c}) for i, (_, c) in enumerate(pairs)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    from clipforge.data import read_manifest

    recs = read_manifest(tmp_path / "m.jsonl", "img", "cap")
    report = write_shards(recs, tmp_path / "out", max_size=16_000, max_count=100, progress=False)
    tars = sorted((tmp_path / "out").glob("*.tar"))
    assert len(tars) > 1 and all(p.stat().st_size <= 16_000 for p in tars)
    assert report.total == 12 and sum(report.shards.values()) == 12
    assert len(_read_shards(tars)) == 12


def test_seeded_shuffle_is_deterministic(tmp_path):
    write_shards(make_pairs(CFG, 30), tmp_path / "s", max_count=7, progress=False)
    pattern = str(tmp_path / "s" / "{000000..000004}.tar")
    assert len(shard_urls(pattern)) == 5

    def order(seed, epoch=0):
        ds = WebDatasetPairs(pattern, seed=seed, shuffle_buffer=10)
        ds.set_epoch(epoch)
        return [it["text"] for it in ds]

    a = order(0)
    assert a == order(0) and sorted(a) == sorted(c for _, c in make_pairs(CFG, 30))
    assert a != order(1) and a != order(0, epoch=1)
    unshuffled = WebDatasetPairs(pattern, shuffle_buffer=0, shuffle_shards=False)
    assert [it["text"] for it in unshuffled] == [c for _, c in make_pairs(CFG, 30)]


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(value):
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def test_img2dataset_layout_and_bad_samples(tmp_path):
    good = _png(10)
    _write_tar(tmp_path / "a.tar", [
        ("0001.jpg", good), ("0001.json", json.dumps({"caption": "json caption", "url": "x"}).encode()),
        ("0002.webp", good[:20]), ("0002.txt", b"corrupt image"),
        ("0003.png", good), ("0003.txt", b"  \n"),
        ("0004.png", good),
        ("0005.txt", b"no image"),
        ("0006.png", good), ("0006.json", json.dumps({"caption": 7}).encode()),
        ("0007.png", good), ("0007.txt", b"plain caption"),
    ])  # fmt: skip
    _write_tar(
        tmp_path / "full.tar",
        [m for i in range(5) for m in ((f"{i}.png", good), (f"{i}.txt", b"ok"))],
    )
    full = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(full[: len(full) // 3])  # a truncated shard
    ds = WebDatasetPairs(tmp_path / "a.tar", shuffle_buffer=0, shuffle_shards=False)
    assert [it["text"] for it in ds] == ["json caption", "plain caption"]
    assert ds.skips.counts() == {
        "corrupt_image": 1, "no_image": 1, "empty_caption": 1, "non_text_caption": 1, "no_caption": 1,
    }  # fmt: skip
    ds = WebDatasetPairs([tmp_path / "b.tar", tmp_path / "a.tar"], shuffle_buffer=0, shuffle_shards=False)
    texts = [it["text"] for it in ds]
    assert 1 <= texts.count("ok") < 5 and texts[-2:] == ["json caption", "plain caption"]  # goes on after it
    assert ds.skips.counts()["corrupt_shard"] == 1


def test_empty_or_missing_shards_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        WebDatasetPairs(str(tmp_path / "nope-{000..002}.tar"))
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.tar shards"):
        WebDatasetPairs(tmp_path / "d")
    _write_tar(tmp_path / "bad.tar", [("1.txt", b"caption only")])
    with pytest.raises(ValueError, match=r"no usable samples .*bad\.tar.*no_image 1"):
        list(WebDatasetPairs(tmp_path / "bad.tar"))
    with pytest.raises(ValueError, match="the source yielded none"):
        write_shards([(tmp_path / "missing.png", "x")], tmp_path / "o", progress=False)


def test_parse_size():
    assert parse_size("100MB") == 100_000_000 and parse_size("1GiB") == 2**30 and parse_size("1.5 kb") == 1500
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")


def test_no_progress_silences_every_bar_of_a_run_on_shards(tmp_path, monkeypatch):
    import tqdm

    from clipforge.cli import main

    write_shards(make_pairs(CFG, 16), tmp_path / "s", max_count=2, progress=False)  # 8 shards: a captions bar
    bars = []
    init = tqdm.std.tqdm.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        bars.append((kwargs.get("desc"), self.disable))

    monkeypatch.setattr(tqdm.std.tqdm, "__init__", record)
    argv = ["train", "--no-progress", "data.kind=webdataset", f"data.train={tmp_path / 's'}",
            "model.preset=tiny-vit", "model.tokenizer=bpe", "model.vocab_size=520", "model.context_length=16",
            "train.batch_size=4", "train.steps=1", "run.tensorboard=false", "run.eval_every=0",
            f"run.output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(argv) == 0
    # the BPE corpus was read through a bar that --no-progress left on
    assert "reading shard captions" in [desc for desc, _ in bars]
    assert [desc for desc, disabled in bars if not disabled] == []
