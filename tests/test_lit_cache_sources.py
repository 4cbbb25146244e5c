"""`clipforge cache-embeddings` from files (manifest, folder, WebDataset shards): unreadable images are
skipped and logged, never given a neighbour's embedding; resumable; the cache stores its captions and
what it was made from; training from it works for any data.kind, refuses other towers / data, never runs
the image tower, and gives the same losses on 2 ranks as in one process."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from clipforge.checkpoints import load
from clipforge.cli import main
from clipforge.config import VisionConfig
from clipforge.data.embedding_cache import CacheMismatchError, EmbeddingCache
from clipforge.data.pairs import read_folder
from clipforge.data.shard_writer import write_shards
from clipforge.lit import ImageClassifier, load_classifier, load_image_tower, save_classifier
from clipforge.models.vision import VisionTransformer
from clipforge.tokenizer import train_bpe
from clipforge.train import build as build_mod
from clipforge.train.build import run_experiment
from clipforge.train.experiment import load_experiment
from clipforge.transforms import PreprocessConfig, eval_transform, load_image
from helpers import free_port, set_rank_env

VISION = VisionConfig(kind="vit", image_size=32, width=32, layers=1, heads=2, patch_size=8)
N = 12  # images written; two of the manifest's rows are unreadable
COLOURS = ["red", "green", "blue", "yellow"]


def _tower(seed: int, path):
    torch.manual_seed(seed)
    return save_classifier(ImageClassifier(VISION, 16, 4), path, ["a", "b", "c", "d"], {"image_size": 32})


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    return _tower(0, tmp_path_factory.mktemp("tower") / "clf")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """img/ with N small PNGs (+ sidecar captions), a CSV manifest over them plus a corrupt and a missing
    image, and the same images as 3 shards."""
    root = tmp_path_factory.mktemp("files")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N):
        arr = rng.integers(0, 256, (24 + i % 3 * 8, 32, 3), dtype=np.uint8)  # different sizes
        Image.fromarray(arr).save(root / "img" / f"{i:02d}.png")
        caps = [f"a {COLOURS[i % 4]} thing {i}"] + ([f"picture {i}"] if i % 2 else [])
        (root / "img" / f"{i:02d}.txt").write_text("\n".join(caps) + "\n")
        rows.append((f"img/{i:02d}.png", "||".join(caps)))
    (root / "bad.png").write_bytes(b"not a png at all")
    rows.insert(3, ("bad.png", "a corrupt image"))
    rows.insert(7, ("gone.png", "a missing image"))
    manifest = root / "pairs.csv"
    manifest.write_text("image,caption\n" + "".join(f"{a},{b}\n" for a, b in rows))
    report = write_shards(read_folder(root / "img"), root / "shards", max_count=4, progress=False)
    assert len(report.shards) == 3
    return root


def _cache(tower, data, out, *extra):
    argv = ["cache-embeddings", "--tower", str(tower), "--data", str(data), "--out", str(out),
            "--shard-size", "4", "--batch-size", "3", "--quiet", *extra]  # fmt: skip
    assert main(argv) == 0
    return EmbeddingCache(out)


def _own_embeddings(tower_dir, paths):
    src = load_image_tower(tower_dir)
    tf = eval_transform(PreprocessConfig.from_dict(src.preprocess))
    with torch.no_grad():
        return src.tower.eval()(torch.stack([tf(load_image(p)) for p in paths]))


def _all(cache):
    return torch.stack([cache[i] for i in range(len(cache))])  # (n, views, D)


def test_manifest_skips_unreadable_rows_without_a_neighbour(tmp_path, files, tower_dir, capsys):
    cache = _cache(tower_dir, files / "pairs.csv", tmp_path / "c")
    out = capsys.readouterr().out
    assert "skipped 2 samples" in out and "skipped.log" in out
    assert len(cache) == N and cache.index["skipped"] == {"corrupt_image": 1, "missing_image": 1}
    log = (tmp_path / "c" / "skipped.log").read_text().splitlines()
    assert len(log) == 2 and "bad.png" in log[0] and log[0].startswith("corrupt_image")
    assert log[1].startswith("missing_image") and "gone.png" in log[1]
    # each row is its own image's embedding (rows in manifest order, the two bad rows left out)
    own = _own_embeddings(tower_dir, [files / "img" / f"{i:02d}.png" for i in range(N)])
    torch.testing.assert_close(_all(cache)[:, 0], own, atol=1e-5, rtol=1e-5)
    caps = cache.captions()
    assert caps[1] == ["a green thing 1", "picture 1"] and caps[4] == ["a red thing 4"]
    src = cache.index["source"]
    assert src["kind"] == "manifest" and src["samples"] == N + 2
    assert cache.index["fingerprint"]["preprocess"]["augment"] == "none"


def test_folder_and_brace_shards_cache_the_same_images(tmp_path, files, tower_dir):
    folder = _cache(tower_dir, files / "img", tmp_path / "f")
    shards = _cache(tower_dir, files / "shards" / "{000000..000002}.tar", tmp_path / "s")
    assert folder.index["source"]["kind"] == "folder" and shards.index["source"]["kind"] == "webdataset"
    own = _own_embeddings(tower_dir, sorted((files / "img").glob("*.png")))
    torch.testing.assert_close(_all(folder)[:, 0], own, atol=1e-5, rtol=1e-5)
    assert torch.equal(_all(folder), _all(shards))  # same bytes, same order
    assert folder.captions() == shards.captions()
    folder_of_tars = _cache(tower_dir, files / "shards", tmp_path / "s2")  # a folder of tars: shards
    assert folder_of_tars.index["source"]["kind"] == "webdataset"


def test_augmented_views_and_resume(tmp_path, files, tower_dir, monkeypatch, capsys):
    args = ("--views", "2", "--augment", "random_resized_crop")
    full = _all(_cache(tower_dir, files / "pairs.csv", tmp_path / "c", *args))
    assert full.shape == (N, 2, 16) and not torch.equal(full[:, 0], full[:, 1])
    # an interrupted run: the last shard never finished, the index not completed
    (tmp_path / "c" / "shard_00002.npy").unlink()
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    (tmp_path / "c" / "index.json").write_text(json.dumps({**index, "complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        EmbeddingCache(tmp_path / "c")
    calls = []
    original = VisionTransformer.forward
    monkeypatch.setattr(VisionTransformer, "forward", lambda self, x, *a, **k: calls.append(len(x)) or
                        original(self, x, *a, **k))  # fmt: skip
    again = _cache(tower_dir, files / "pairs.csv", tmp_path / "c", *args)
    assert sum(calls) == 4 * 2  # only the missing shard's 4 rows, 2 views each
    assert torch.equal(_all(again), full)
    assert again.index["skipped"] == {"corrupt_image": 1, "missing_image": 1}
    argv = ["cache-embeddings", "--tower", str(tower_dir), "--data", str(files / "pairs.csv"), "--out",
            str(tmp_path / "c"), "--views", "3", "--quiet"]  # fmt: skip
    assert main(argv) == 1  # another layout in the same directory: refused, saying what differs
    assert "views: cache has 2, expected 3" in capsys.readouterr().err


def _overrides(out, tower, cache, *extra):
    return [
        "model.lit=Lu",
        f"model.image_tower={tower}",
        "model.context_length=16",
        f"data.embedding_cache={cache}",
        "train.steps=3",
        "train.batch_size=8",
        "train.device=cpu",
        "optim.warmup_steps=1",
        "optim.schedule=constant",
        "optim.lr=1e-2",
        "run.log_every=1",
        f"run.output_dir={out}",
        "run.checkpoint_every=100",
        "run.tensorboard=false",
        *extra,
    ]


@pytest.mark.parametrize("with_data", [True, False])
def test_train_from_a_manifest_cache(tmp_path, files, tower_dir, monkeypatch, with_data):
    cache = tmp_path / "c"
    _cache(tower_dir, files / "pairs.csv", cache)
    calls = []
    original = VisionTransformer.forward
    monkeypatch.setattr(VisionTransformer, "forward", lambda self, *a, **k: calls.append(1) or
                        original(self, *a, **k))  # fmt: skip
    # the data files are not read: without data.train the cache stands alone; with it, it is checked
    monkeypatch.setattr("clipforge.data.pairs.load_image", lambda *a, **k: pytest.fail("an image was read"))
    data = ["data.kind=manifest", f"data.train={files / 'pairs.csv'}"] if with_data else []
    out = tmp_path / "run"
    argv = ["train", "--no-progress", *_overrides(out, tower_dir, cache, "model.tokenizer=bpe",
                                                  "model.vocab_size=600", *data)]  # fmt: skip
    assert main(argv) == 0
    assert calls == []  # the image tower never ran
    clf, _ = load_classifier(tower_dir)
    model, _, _ = load(out / "model")
    trained = model.visual.state_dict()
    for k, v in clf.visual.state_dict().items():
        assert torch.equal(v, trained[k]), f"locked weight {k} changed"


def test_mismatch_is_refused_with_what_differs(tmp_path, files, tower_dir):
    cache = tmp_path / "c"
    _cache(tower_dir, files / "pairs.csv", cache)
    data = ["data.kind=manifest", f"data.train={files / 'pairs.csv'}", "model.tokenizer=bpe",
            "model.vocab_size=600"]  # fmt: skip
    other = _tower(1, tmp_path / "other")
    with pytest.raises(CacheMismatchError, match=r"another image tower.*weights differ"):
        build_mod.build_trainer(load_experiment(None, _overrides(tmp_path / "r1", other, cache, *data)),
                                progress=False)  # fmt: skip
    edited = tmp_path / "edited.csv"  # same images, one caption changed
    edited.write_text((files / "pairs.csv").read_text().replace("picture 5", "photo 5"))
    (tmp_path / "img").symlink_to(files / "img")
    (tmp_path / "bad.png").symlink_to(files / "bad.png")
    data[1] = f"data.train={edited}"
    with pytest.raises(CacheMismatchError, match="captions differ"):
        build_mod.build_trainer(load_experiment(None, _overrides(tmp_path / "r2", tower_dir, cache, *data)),
                                progress=False)  # fmt: skip
    data[:2] = ["data.kind=folder", f"data.train={files / 'img'}"]
    with pytest.raises(CacheMismatchError, match="data kind: cache has 'manifest', data has 'folder'"):
        build_mod.build_trainer(load_experiment(None, _overrides(tmp_path / "r3", tower_dir, cache, *data)),
                                progress=False)  # fmt: skip


def test_cache_with_a_file_kind_is_accepted_by_the_config(tmp_path):
    exp = load_experiment(None, ["model.lit=Lu", "model.image_tower=x", "data.embedding_cache=c",
                                 "data.kind=folder", "data.train=d"])  # fmt: skip
    assert exp.data.embedding_cache == "c" and exp.data.kind == "folder"


# ------------------------------------------------------------------------------------------ 2 ranks
def _worker(rank: int, world: int, port: int, out: str, argv: list) -> None:
    set_rank_env(rank, world, port)
    res = run_experiment(load_experiment(None, argv), progress=False)
    torch.save({"losses": res.losses, "step": res.step}, os.path.join(out, f"result{rank}.pt"))


def test_two_ranks_from_a_cache_equal_one_process(tmp_path, files, tower_dir):
    cache = tmp_path / "c"
    _cache(tower_dir, files / "pairs.csv", cache, "--views", "2", "--augment", "square_crop")
    tok = tmp_path / "tok"
    train_bpe([c for row in EmbeddingCache(cache).captions() for c in row], 600, 16).save(tok)
    torch.set_num_threads(1)
    one = _overrides(tmp_path / "one", tower_dir, cache, f"model.tokenizer={tok}")
    single = run_experiment(load_experiment(None, one), progress=False)
    (tmp_path / "two").mkdir()
    argv = _overrides(tmp_path / "two", tower_dir, cache, f"model.tokenizer={tok}")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "two"), argv), nprocs=2, join=True)
    for r in range(2):
        got = torch.load(tmp_path / "two" / f"result{r}.pt")
        assert got["step"] == 3
        assert got["losses"] == pytest.approx(single.losses, abs=1e-5)
