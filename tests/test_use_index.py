"""clipforge.use index + search: kind chosen from count and memory, approximate indexes keep >= 0.95 of the
exact top-10 (tuned for it on build), incremental add without rebuild, deletion, search by text / image /
id / vector, dedup."""

import itertools
import json
import re
import shutil
import warnings

import numpy as np
import pytest

from clipforge.files import write_json_atomic
from clipforge.use import EmbeddingStore, EmbedOptions, embed
from clipforge.use.embedder import write_part
from clipforge.use.index import build_index, choose_kind, delete_ids, parse_memory
from clipforge.use.search import Searcher
from clipforge.use.store import FORMAT
from clipforge.use.tune import needs_tuning, tune_search
from use_helpers import tiny_checkpoint, write_images


def synthetic_dir(directory, n, dim=32, parts=2, seed=0):
    """An embedding directory of clustered unit vectors (like real embeddings: not uniform on the sphere)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dim))
    x = centres[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    manifest = {
        "format": FORMAT,
        "version": 1,
        "model": {"fingerprint": "synthetic", "source": "none"},
        "dim": dim,
        "dtype": "float32",
        "modality": "image",
        "modalities": ["image"],
        "parts": [],
        "count": 0,
        "skipped": {},
        "input_skipped": {},
        "complete": True,
    }
    directory.mkdir(parents=True)
    bounds = np.linspace(0, n, parts + 1).astype(int)
    for p, (a, b) in enumerate(itertools.pairwise(bounds)):
        rows = {
            "key": [f"v{i}" for i in range(a, b)],
            "path": [None] * (b - a),
            "caption": [None] * (b - a),
            "width": [None] * (b - a),
            "height": [None] * (b - a),
        }
        write_part(directory, f"part-{p:05d}", int(a), rows, {"image": [x[a:b]]}, [])
        manifest["parts"].append(
            {"name": f"part-{p:05d}", "rows": int(b - a), "first_id": int(a), "skipped": {}}
        )
    manifest["count"] = n
    write_json_atomic(directory / "manifest.json", manifest)
    return x


def test_kind_follows_count_and_memory():
    assert parse_memory("4G") == 4 * 1024**3 and parse_memory("512M") == 512 * 1024**2
    assert choose_kind(1_000, 512, parse_memory("4G")) == "flat"
    assert choose_kind(1_000_000, 512, parse_memory("4G")) == "hnsw"
    assert choose_kind(1_000_000, 512, parse_memory("1G")) == "ivfpq"


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_recall_against_exact(tmp_path, kind):
    x = synthetic_dir(tmp_path / "e", 5_000)
    build_index(tmp_path / "e", kind=kind)
    rng = np.random.default_rng(1)
    q = x[rng.choice(len(x), 100, replace=False)] + 0.3 * rng.normal(size=(100, x.shape[1])).astype(
        np.float32
    )
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    hits = Searcher(tmp_path / "e").search(q, k=10)
    recall = np.mean([len({h["id"] for h in hs} & set(e.tolist())) / 10 for hs, e in zip(hits, exact)])
    assert recall >= 0.95, recall
    np.testing.assert_allclose(
        hits[0][0]["score"], float(q[0] @ x[hits[0][0]["id"]]), atol=1e-5 if kind == "hnsw" else 1e-6
    )


def test_incremental_add_and_delete(tmp_path):
    x = synthetic_dir(tmp_path / "e", 600, parts=3)
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    full = manifest["parts"]
    manifest["parts"], manifest["count"] = full[:2], full[2]["first_id"]  # as if part 3 came later
    write_json_atomic(tmp_path / "e" / "manifest.json", manifest)
    info = build_index(tmp_path / "e", kind="flat")
    assert info["count"] == 400 and info["parts"] == ["part-00000", "part-00001"]
    manifest["parts"], manifest["count"] = full, 600
    write_json_atomic(tmp_path / "e" / "manifest.json", manifest)
    info = build_index(tmp_path / "e")  # adds part 3 only
    assert info["count"] == 600 and len(info["parts"]) == 3
    s = Searcher(tmp_path / "e")
    top = s.search(s.query(id=599), k=1)[0][0]
    assert top["id"] == 599 and top["key"] == "v599" and top["score"] == pytest.approx(1.0, abs=1e-5)
    assert delete_ids(tmp_path / "e", [599, 3]) == 2
    s = Searcher(tmp_path / "e")
    assert s.index.ntotal == 598
    assert 599 not in {h["id"] for h in s.search(x[599], k=20)[0]}
    assert build_index(tmp_path / "e")["count"] == 598  # nothing new, deleted stay deleted


def test_a_stale_index_is_named_when_searched(tmp_path, capsys):
    """After `embed --append` without `clipforge index` the index lacked the new part's rows and searches
    missed them without a word; now opening it warns with both counts and the command to run."""
    from clipforge.cli import main as cli_main

    d = tmp_path / "e"
    synthetic_dir(d, 600, parts=3)
    manifest = json.loads((d / "manifest.json").read_text())
    full = manifest["parts"]
    manifest["parts"], manifest["count"] = full[:2], 400
    write_json_atomic(d / "manifest.json", manifest)
    build_index(d, kind="flat")
    delete_ids(d, [5])  # deleted rows are not what is missing: the message counts unindexed parts
    manifest["parts"], manifest["count"] = full, 600  # as `embed --append` leaves it
    write_json_atomic(d / "manifest.json", manifest)
    want = f"{d}: the image index covers 400 of the 600 stored rows; searches miss the other 200 "
    want += f"(in part-00002, embedded after the index was built): run `clipforge index {d}`"
    with pytest.warns(UserWarning, match=re.escape(want)):
        Searcher(d)
    assert cli_main(["search", str(d), "--id", "599", "-k", "1"]) == 0
    assert "clipforge search: warning: " in capsys.readouterr().err
    build_index(d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # up to date: nothing said
        s = Searcher(d)
    assert s.search(s.query(id=599), k=1)[0][0]["id"] == 599


def test_hnsw_delete_filters(tmp_path):
    x = synthetic_dir(tmp_path / "e", 500)
    build_index(tmp_path / "e", kind="hnsw")
    delete_ids(tmp_path / "e", [7])
    hits = Searcher(tmp_path / "e").search(x[7], k=5)[0]
    assert 7 not in {h["id"] for h in hits} and len(hits) == 5


def test_search_by_text_image_id_and_dedup(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    photos = tmp_path / "photos"
    files = write_images(photos, 10)
    (photos / "copy.png").write_bytes(files[1].read_bytes())  # an exact duplicate of img001.png
    embed(photos, tmp_path / "emb", ckpt, options=EmbedOptions(progress=False, dtype="float32"))
    build_index(tmp_path / "emb")
    s = Searcher(tmp_path / "emb")
    by_image = s.search(s.query(image=files[1]), k=3)[0]
    assert {by_image[0]["key"], by_image[1]["key"]} == {"img001.png", "copy.png"}
    assert by_image[0]["score"] == pytest.approx(1.0, abs=1e-5)
    collapsed = s.search(s.query(image=files[1]), k=3, dedup=0.99)[0]
    assert len(collapsed) == 3 and len({h["key"] for h in collapsed} & {"img001.png", "copy.png"}) == 1
    by_text = s.search(s.query(text="a red picture"), k=11)[0]
    store = EmbeddingStore(tmp_path / "emb")
    q = s.encoder.encode_texts(["a red picture"]).numpy()[0]
    scores = store.vectors(np.arange(store.count)) @ q
    np.testing.assert_allclose([h["score"] for h in by_text], np.sort(scores)[::-1], atol=1e-5)
    assert sorted(h["id"] for h in by_text) == list(range(11))
    by_id = s.search(s.query(id=by_text[0]["id"]), k=1)[0][0]
    assert by_id["id"] == by_text[0]["id"]
    with pytest.raises(ValueError, match="exactly one"):
        s.query(text="a", id=1)


def recall_at_10(searcher, q, x):
    """recall@10 of the searcher's hits against a numpy exact top-10 (independent of the tuner's code)."""
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    hits = searcher.search(q, k=10)
    return float(np.mean([len({h["id"] for h in hs} & set(e.tolist())) / 10 for hs, e in zip(hits, exact)]))


def fresh_queries(n, dim, seed):
    """New points of synthetic_dir's distribution (seed 0: the same cluster centres), none of them indexed,
    and the same points moved far off the data (cosine ~0.5 to where they were, like text queries)."""
    centres = np.random.default_rng(0).normal(size=(50, dim))  # synthetic_dir's first draw
    rng = np.random.default_rng(seed)
    near = centres[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, dim))
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    far = near + rng.normal(size=(n, dim)) * (1.73 / np.sqrt(dim))
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    return near.astype(np.float32), far.astype(np.float32)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_tuned_index_reaches_target_on_fresh_queries(tmp_path, kind):
    x = synthetic_dir(tmp_path / "e", 6_000)
    info = build_index(tmp_path / "e", kind=kind)
    tuned = json.loads((tmp_path / "e" / "index" / "image.json").read_text())["search"]
    assert tuned == info["search"] and tuned["reached"] and tuned["target_recall"] == 0.95
    assert tuned["count"] == 6_000 and tuned["queries"] == 300 and tuned["recall@10"] >= 0.95
    names = ("ef_search",) if kind == "hnsw" else ("nprobe", "rerank")
    # the smallest values of the sweep that reached the target (recall less 2 standard errors): every
    # smaller ef_search, every smaller nprobe (at the deepest rerank) and every smaller rerank fell short
    assert {n: tuned["tried"][-1][n] for n in names} == {n: tuned[n] for n in names}
    assert tuned["recall@10"] - 2 * tuned["stderr"] >= 0.95
    smaller = [t for t in tuned["tried"] if tuple(t[n] for n in names) < tuple(tuned[n] for n in names)]
    assert smaller and all(t["recall@10"] - 2 * t["stderr"] < 0.95 for t in smaller)
    s = Searcher(tmp_path / "e")
    if kind == "hnsw":
        import faiss

        assert faiss.downcast_index(s.index.index).hnsw.efSearch == tuned["ef_search"] < 256
    else:
        assert (s.index.nprobe, s.rerank) == (tuned["nprobe"], tuned["rerank"])
        assert tuned["nprobe"] < info["params"]["nlist"]
    for q in fresh_queries(300, 32, seed=7):
        assert recall_at_10(s, q, x) >= 0.95


def test_explicit_search_parameters_override_tuned(tmp_path):
    import faiss

    synthetic_dir(tmp_path / "e", 3_000)
    build_index(tmp_path / "e", kind="ivfpq")
    s = Searcher(tmp_path / "e", nprobe=5, rerank=3)
    assert (s.index.nprobe, s.rerank) == (5, 3)
    shutil.rmtree(tmp_path / "e" / "index")
    info = build_index(tmp_path / "e", kind="hnsw", target_recall=0.8)
    assert info["search"]["target_recall"] == 0.8
    s = Searcher(tmp_path / "e", ef_search=300)
    assert faiss.downcast_index(s.index.index).hnsw.efSearch == 300
    s = Searcher(tmp_path / "e")
    assert faiss.downcast_index(s.index.index).hnsw.efSearch == info["search"]["ef_search"]


def test_tuning_is_bounded_and_says_when_short(tmp_path, capsys):
    synthetic_dir(tmp_path / "e", 2_000)
    build_index(tmp_path / "e", kind="hnsw", tune=False)
    assert "search" not in json.loads((tmp_path / "e" / "index" / "image.json").read_text())
    info = tune_search(tmp_path / "e", target_recall=1.0, max_seconds=0.0)
    assert not info["search"]["reached"] and len(info["search"]["tried"]) == 1
    assert "< target 1.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="target recall"):
        tune_search(tmp_path / "e", target_recall=1.5)


def test_retune_only_when_asked_or_grown():
    tuned = {"kind": "hnsw", "count": 1_000, "search": {"target_recall": 0.95, "count": 1_000}}
    assert not needs_tuning(tuned, None)
    assert not needs_tuning({**tuned, "count": 1_050}, None)  # a small add keeps the tuned values
    assert needs_tuning({**tuned, "count": 1_200}, None)
    assert needs_tuning(tuned, 0.95)  # asked for
    assert needs_tuning({"kind": "ivfpq", "count": 1_000}, None)  # never tuned
    assert not needs_tuning({"kind": "flat", "count": 1_000}, 0.95)  # exact


def test_cli_tunes_on_demand(tmp_path, capsys):
    from clipforge.cli import main

    synthetic_dir(tmp_path / "e", 2_000)
    assert main(["index", str(tmp_path / "e"), "--kind", "hnsw", "--no-tune"]) == 0
    assert "search defaults" not in capsys.readouterr().out
    assert main(["index", str(tmp_path / "e"), "--target-recall", "0.9"]) == 0  # nothing new: tunes only
    out = capsys.readouterr().out
    tuned = json.loads((tmp_path / "e" / "index" / "image.json").read_text())["search"]
    assert f"search defaults {{'ef_search': {tuned['ef_search']}}}" in out and tuned["target_recall"] == 0.9


def test_flat_index_needs_no_tuning(tmp_path):
    synthetic_dir(tmp_path / "e", 300)
    assert "search" not in build_index(tmp_path / "e")  # flat: exact, nothing to tune
    tuned = tune_search(tmp_path / "e", target_recall=0.99)["search"]
    assert tuned["recall@10"] == 1.0 and tuned["reached"]
